"""Building a federation's datasets from the task section of a config."""

import json
from pathlib import Path

import pytest

from fedsilo.config import FedsiloConfig, parse_config
from fedsilo.data.records import ChatRecord, DataError
from fedsilo.data.tasks import build_task


def _jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _files_config(tmp_path: Path, gold_rows: list[dict[str, str]]) -> FedsiloConfig:
    a = _jsonl(tmp_path / "a.jsonl", [{"prompt": "p1", "response": "r1"}])
    b = _jsonl(tmp_path / "b.jsonl", [{"text": "free text"}, {"prompt": "p2", "response": "r2"}])
    gold = _jsonl(tmp_path / "gold.jsonl", gold_rows)
    return parse_config(
        {
            "task": {
                "name": "files",
                "gold_path": str(gold),
                "sites": [{"name": "st-mary", "path": str(a)}, {"name": "county", "path": str(b)}],
            },
            "strategy": {"min_sites": 1},
        },
        source="t",
    )


def test_files_task_reads_each_site_and_the_gold_set(tmp_path: Path) -> None:
    config = _files_config(tmp_path, [{"prompt": "q", "response": "a"}])

    task = build_task(config.task, seed=0)

    assert [site.name for site in task.sites] == ["st-mary", "county"]
    assert len(task.sites[1].records) == 2
    assert task.gold == (ChatRecord(prompt="q", response="a"),)


def test_gold_set_needs_reference_answers(tmp_path: Path) -> None:
    config = _files_config(tmp_path, [{"prompt": "q", "response": "a"}, {"text": "no answer"}])

    with pytest.raises(DataError, match=r"gold\.jsonl: record 2"):
        build_task(config.task, seed=0)


def test_icd10_task_is_deterministic_and_takes_the_system_prompt() -> None:
    config = parse_config(
        {"task": {"num_sites": 2, "examples_per_site": 4, "gold_size": 4, "system_prompt": "S"}},
        source="t",
    )

    first = build_task(config.task, seed=3)
    second = build_task(config.task, seed=3)

    assert first == second
    assert first.system_prompt == "S"
    assert len(first.sites) == 2


@pytest.mark.parametrize(("name", "sites"), [("drug-review", 2), ("shakespeare", 3)])
def test_all_keeps_every_record_of_each_site(name: str, sites: int) -> None:
    def sizes(examples: object) -> list[int]:
        config = parse_config(
            {"task": {"name": name, "num_sites": sites, "examples_per_site": examples}},
            source="t",
        )
        return [len(site.records) for site in build_task(config.task, seed=0).sites]

    every = sizes("all")

    assert every == sizes(100_000)
    assert sum(sizes(4)) < sum(every)


def test_files_task_scores_whole_answers_by_default(tmp_path: Path) -> None:
    config = _files_config(tmp_path, [{"prompt": "q", "response": "Theft; Laptop"}])

    assert build_task(config.task, seed=0).metric == "exact"


def test_code_metric_on_a_files_task_needs_icd10_gold_answers(tmp_path: Path) -> None:
    config = _files_config(tmp_path, [{"prompt": "q", "response": "Theft; Laptop"}])
    coded = config.model_copy(update={"task": config.task.model_copy(update={"metric": "code"})})

    with pytest.raises(DataError, match=r"gold\.jsonl: record 1: .*ICD-10-CM codes"):
        build_task(coded.task, seed=0)


def test_code_metric_on_a_files_task_with_code_answers_is_kept(tmp_path: Path) -> None:
    config = _files_config(tmp_path, [{"prompt": "q", "response": "E11.9"}])
    coded = config.model_copy(update={"task": config.task.model_copy(update={"metric": "code"})})

    assert build_task(coded.task, seed=0).metric == "code"
