"""Build a federation's datasets from the task section of a config.

Two kinds of task: the built-in ICD-10-CM coding task (sites are hospital specialties made from
the public code set), and "files", where each site's records and the gold set are files on disk.
"""

from __future__ import annotations

from collections.abc import Callable

from fedsilo.config import TaskSection
from fedsilo.data.icd10 import SiteData, TaskData, build_icd10_task
from fedsilo.data.records import ChatRecord, DataError, load_records


def _icd10(task: TaskSection, seed: int) -> TaskData:
    built = build_icd10_task(
        num_sites=task.num_sites,
        partition=task.partition,
        alpha=task.alpha,
        examples_per_site=task.examples_per_site,
        gold_size=task.gold_size,
        seed=seed,
        chapters=task.chapters,
    )
    if task.system_prompt is None:
        return built
    return TaskData(
        name=built.name, system_prompt=task.system_prompt, sites=built.sites, gold=built.gold
    )


def _files(task: TaskSection, seed: int) -> TaskData:
    del seed  # the files are the split; nothing is drawn at random
    sites = tuple(
        SiteData(name=site.name, records=tuple(load_records(site.path))) for site in task.sites
    )
    assert task.gold_path is not None  # enforced by TaskSection's validator
    gold: list[ChatRecord] = []
    for position, record in enumerate(load_records(task.gold_path), start=1):
        if not isinstance(record, ChatRecord):
            raise DataError(
                f"{task.gold_path}: record {position}: a gold record needs 'prompt' and "
                "'response' fields (a reference answer), not 'text'"
            )
        gold.append(record)
    return TaskData(
        name="files",
        system_prompt=task.system_prompt,
        sites=sites,
        gold=tuple(gold),
    )


TASK_BUILDERS: dict[str, Callable[[TaskSection, int], TaskData]] = {
    "icd10": _icd10,
    "files": _files,
}


def build_task(task: TaskSection, *, seed: int) -> TaskData:
    """Every site's records and the held-out gold set, deterministic for a seed."""
    return TASK_BUILDERS[task.name](task, seed)
