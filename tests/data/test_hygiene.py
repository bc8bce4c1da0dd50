"""Data hygiene warnings: duplicated records, gold records in a site's data, one file twice."""

import json
from collections.abc import Callable
from pathlib import Path

from fedsilo.config import FedsiloConfig
from fedsilo.data.hygiene import check_data_hygiene
from fedsilo.data.tasks import build_task

from ..simulation.conftest import run_with_grid

GOLD = [{"prompt": f"ICD-10-CM code for: gold {n}", "response": f"G{n:02d}.0"} for n in range(4)]


def _records(prefix: str, count: int) -> list[dict[str, str]]:
    return [
        {"prompt": f"ICD-10-CM code for: {prefix} {n}", "response": f"A{n:02d}.1"}
        for n in range(count)
    ]


def _write(path: Path, records: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _files_task(tmp_path: Path) -> dict[str, object]:
    east = _write(tmp_path / "east.jsonl", [*_records("east", 6), *_records("east", 2), GOLD[0]])
    west = _write(tmp_path / "west.jsonl", _records("west", 6))
    copy = _write(tmp_path / "copy-of-west.jsonl", _records("west", 6))
    return {
        "name": "files",
        "gold_path": str(_write(tmp_path / "gold.jsonl", GOLD)),
        "sites": [
            {"name": "east", "path": str(east)},
            {"name": "west", "path": str(west)},
            {"name": "north", "path": str(west)},
            {"name": "south", "path": str(copy)},
        ],
    }


def test_each_finding_is_counted(make_config: Callable[..., FedsiloConfig], tmp_path: Path) -> None:
    config = make_config(task=_files_task(tmp_path))

    hygiene = check_data_hygiene(build_task(config.task, seed=0), config.task)

    assert hygiene.duplicated_records == {"east": 2}
    assert hygiene.gold_records_in_site == {"east": 1}
    assert hygiene.shared_files == (("north", "south", "west"),)
    assert hygiene.count == 3


def test_clean_generated_task_has_no_findings(make_config: Callable[..., FedsiloConfig]) -> None:
    config = make_config()

    assert check_data_hygiene(build_task(config.task, seed=0), config.task).count == 0


def test_run_logs_the_findings_and_records_them_in_run_json(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    config = make_config(run={"rounds": 1}, task=_files_task(tmp_path))

    reporter = run_with_grid(config, tmp_path / "run")

    notices = " | ".join(reporter.notices)
    assert "site east holds 2 duplicated record(s)" in notices
    assert "site east holds 1 record(s) of the gold set" in notices
    assert "sites north, south, west read the same data file" in notices
    assert "3 finding(s)" in notices
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["data_hygiene"]["findings"] == 3
    assert info["data_hygiene"]["duplicated_records"] == {"east": 2}
