"""Build a federation's datasets from the task section of a config.

Built-in tasks from data shipped in installed packages: ICD-10-CM coding (sites are hospital
specialties, or a Dirichlet split over chapters), drug-review sentiment (sites are clinics by
condition) and Shakespeare next-line prediction (a site per play and role). And "files", where
each site's records and the gold set are files on disk.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from fedsilo.config import TaskSection
from fedsilo.data.drug_review import build_drug_review_task
from fedsilo.data.icd10 import SiteData, TaskData, build_icd10_task, chapter_of_code
from fedsilo.data.records import ChatRecord, DataError, load_records
from fedsilo.data.shakespeare import build_shakespeare_task
from fedsilo.evaluation.metrics import is_icd10_answer


def _examples_per_site(task: TaskSection) -> int | None:
    """The configured count, None for "all"."""
    return None if task.examples_per_site == "all" else task.examples_per_site


def _icd10(task: TaskSection, seed: int) -> TaskData:
    built = build_icd10_task(
        num_sites=task.num_sites,
        partition=task.partition,
        alpha=task.alpha,
        examples_per_site=_examples_per_site(task),
        gold_size=task.gold_size,
        seed=seed,
        chapters=task.chapters,
        phrasing_size=task.gold_phrasings,
        ranking_candidates=task.gold_ranking_candidates,
        inclusion_terms_in_training=task.train_on_inclusion_terms,
    )
    return built


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
        # Whole-answer match: "code" reads only the first word, so short answers that share
        # it ("Theft; Laptop", "Theft; Paper") would all count as right.
        metric="exact",
    )


def _drug_review(task: TaskSection, seed: int) -> TaskData:
    return build_drug_review_task(
        num_sites=task.num_sites,
        examples_per_site=_examples_per_site(task),
        gold_size=task.gold_size,
        seed=seed,
    )


def _shakespeare(task: TaskSection, seed: int) -> TaskData:
    return build_shakespeare_task(
        num_sites=task.num_sites,
        examples_per_site=_examples_per_site(task),
        gold_size=task.gold_size,
        seed=seed,
    )


TASK_BUILDERS: dict[str, Callable[[TaskSection, int], TaskData]] = {
    "icd10": _icd10,
    "drug-review": _drug_review,
    "shakespeare": _shakespeare,
    "files": _files,
}


def build_task(task: TaskSection, *, seed: int) -> TaskData:
    """Every site's records and the held-out gold set, deterministic for a seed.

    ``task.system_prompt`` and ``task.metric``, when given, replace the task's own. With
    ``task.only_sites`` only those sites are kept (in the task's order); for the ICD-10 task
    the gold set then keeps only the codes of the chapters those sites hold, so a cluster's
    expert is scored on its own domain.
    """
    built = TASK_BUILDERS[task.name](task, seed)
    if task.system_prompt is not None:
        built = dataclasses.replace(built, system_prompt=task.system_prompt)
    if task.metric is not None:
        built = dataclasses.replace(built, metric=task.metric)
    if built.metric == "code" and task.name == "files":
        _check_code_answers(built.gold, source=str(task.gold_path))
    if task.only_sites:
        built = restrict_to_sites(built, task.only_sites)
    if task.validation_share > 0:
        built = hold_out_validation(built, share=task.validation_share, seed=seed)
    return built


def hold_out_validation(data: TaskData, *, share: float, seed: int) -> TaskData:
    """``data`` with ``share`` of each site's question-answer records moved to ``validation``.

    Each site with at least two such records gives ``round(share * n)`` of them (at least one,
    never all), drawn by ``seed`` and the site's position, so every build with the same settings
    holds out the same records. A training record equal to a held-out one is dropped too, so the
    split is disjoint from what the sites train on; the gold set is disjoint from the sites'
    data already, so from the split as well.
    """
    sites: list[SiteData] = []
    validation: list[ChatRecord] = []
    for index, site in enumerate(data.sites):
        chats = [i for i, record in enumerate(site.records) if isinstance(record, ChatRecord)]
        if len(chats) < 2:
            sites.append(site)
            continue
        count = min(len(chats) - 1, max(1, round(share * len(chats))))
        generator = np.random.default_rng(np.random.SeedSequence([seed, index, 0x5A11D]))
        chosen = sorted(int(i) for i in generator.choice(chats, size=count, replace=False))
        held = [site.records[i] for i in chosen]
        held_set = set(held)
        kept = tuple(record for record in site.records if record not in held_set)
        if not kept:
            raise ValueError(
                f"site {site.name}: task.validation_share leaves no record to train on"
            )
        sites.append(dataclasses.replace(site, records=kept))
        validation += [record for record in held if isinstance(record, ChatRecord)]
    return dataclasses.replace(data, sites=tuple(sites), validation=tuple(validation))


def _check_code_answers(gold: tuple[ChatRecord, ...], *, source: str) -> None:
    """Metric "code" compares the first word as an ICD-10-CM code: only for gold answers that
    are such codes, or it scores answers that merely start alike as right."""
    for position, record in enumerate(gold, start=1):
        if not is_icd10_answer(record.response):
            raise DataError(
                f'{source}: record {position}: task.metric = "code" needs gold answers that '
                f'are ICD-10-CM codes, got {record.response[:60]!r}; use "exact", "label" '
                'or "similarity" for other answers'
            )


def task_metric(task: TaskSection) -> str:
    """The metric a task's gold set is scored with: the configured one or the task's own."""
    return task.metric or DEFAULT_METRICS[task.name]


DEFAULT_METRICS: dict[str, str] = {
    "icd10": "code",
    "files": "exact",
    "drug-review": "sentiment",
    "shakespeare": "next-token",
}
"""Each task's own metric, when its config names none."""


def restrict_to_sites(data: TaskData, names: tuple[str, ...]) -> TaskData:
    """``data`` with only the sites ``names`` (ValueError naming any unknown site)."""
    known = [site.name for site in data.sites]
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"task.only_sites names {unknown}, not sites of this task: {known}")
    sites = tuple(site for site in data.sites if site.name in names)
    gold = data.gold
    if data.name == "icd10":
        chapters = {
            chapter_of_code(record.response)
            for site in sites
            for record in site.records
            if isinstance(record, ChatRecord)
        }
        gold = tuple(record for record in data.gold if chapter_of_code(record.response) in chapters)
        data = dataclasses.replace(
            data,
            phrasings=tuple(r for r in data.phrasings if chapter_of_code(r.response) in chapters),
            ranking=tuple(
                item for item in data.ranking if chapter_of_code(item.record.response) in chapters
            ),
        )
    if not gold:
        raise ValueError(f"sites {list(names)} keep no gold record of their own domain")
    return dataclasses.replace(data, sites=sites, gold=gold)
