"""Folding results files that two processes measured for one quality benchmark into one."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from fedsilo.bench.merge import MergeError, merge_quality_results
from fedsilo.bench.summary import update_summary
from fedsilo.cli.main import main


def _row(round_number: int, category: float, loss: float) -> dict[str, Any]:
    return {
        "round": round_number,
        "gold_accuracy": category / 2,
        "gold_category_accuracy": category,
        "gold_loss": loss,
    }


def _part(algorithms: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A results file of the shape run_quality_benchmark writes, holding ``algorithms``."""
    data: dict[str, Any] = {
        "benchmark": "quality",
        "task": "icd10-by-specialty",
        "model": "smollm2-135m-instruct",
        "base_model_hash": "ab" * 32,
        "budget": {"num_sites": 8, "rounds": 2, "seed": 0},
        "train": {"precision": "auto"},
        "lora": {"rank": 16},
        "task_settings": {"name": "icd10", "num_sites": 8},
        "metric": "code",
        "metric_meaning": {
            "gold_accuracy": "exact code",
            "gold_category_accuracy": "same 3-character category",
        },
        "sites": {"neurology": 600},
        "validation_count": 0,
        "gold_count": 200,
        "round0": {"gold_accuracy": 0.0, "gold_category_accuracy": 0.0, "gold_loss": 4.62},
        "algorithms": algorithms,
        "goals": {},
        "edge_cases": {},
        "hyperparameters": {"chosen_by": "given"},
        "complete": True,
        "out_dir": "runs/part",
        "wall_seconds": 100.0,
        "peak_rss_mb": 1000.0,
        "machine": {"device": "cpu", "cpus": 2},
        "measured_at": "2026-12-06T04:00:00Z",
    }
    data.update(fields)
    return data


CENTRALIZED = {"per_round": [_row(1, 0.25, 2.0), _row(2, 0.5, 1.0)]}
FEDAVG = {"per_round": [_row(1, 0.1, 3.0), _row(2, 0.4, 1.5)]}


def _write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_merge_unions_the_algorithms_and_recomputes_the_goals(tmp_path: Path) -> None:
    into = _write(tmp_path / "quality-x.json", _part({"fedavg": FEDAVG}, goals={"fedavg": {}}))
    other = _write(
        tmp_path / "central.json",
        _part(
            {"centralized": CENTRALIZED},
            out_dir="runs/central",
            wall_seconds=250.0,
            peak_rss_mb=1500.0,
            measured_at="2026-12-06T05:00:00Z",
        ),
    )

    merged = merge_quality_results(into, [other])

    assert json.loads(into.read_text()) == merged
    assert set(merged["algorithms"]) == {"fedavg", "centralized"}
    goals = merged["goals"]["fedavg"]
    assert goals["gold_category_accuracy_vs_centralized"] == pytest.approx(0.4 / 0.5)
    # (4.62 - 1.5) of centralized's (4.62 - 1.0)
    assert goals["gold_loss_reduction_vs_centralized"] == pytest.approx(3.12 / 3.62)
    assert merged["wall_seconds"] == pytest.approx(350.0)
    assert merged["peak_rss_mb"] == 1500.0
    assert merged["measured_at"] == "2026-12-06T05:00:00Z"
    assert merged["out_dir"] == "runs/part"  # the target's run folder: where --resume goes on
    assert [(p["results"], p["algorithms"], p["out_dir"]) for p in merged["merged_from"]] == [
        (str(into), ["fedavg"], "runs/part"),
        (str(other), ["centralized"], "runs/central"),
    ]
    assert merged["complete"] is True


def test_an_incomplete_part_leaves_the_merge_incomplete(tmp_path: Path) -> None:
    into = _write(tmp_path / "a.json", _part({"fedavg": FEDAVG}))
    other = _write(tmp_path / "b.json", _part({"centralized": CENTRALIZED}, complete=False))

    assert merge_quality_results(into, [other])["complete"] is False


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("budget", {"num_sites": 8, "rounds": 3, "seed": 0}),
        ("base_model_hash", "cd" * 32),
        ("gold_count", 100),
        ("lora", {"rank": 8}),
    ],
)
def test_a_part_of_another_benchmark_is_refused_naming_file_and_field(
    tmp_path: Path, field: str, value: Any
) -> None:
    into = _write(tmp_path / "a.json", _part({"fedavg": FEDAVG}))
    before = into.read_bytes()
    other = _write(tmp_path / "b.json", _part({"centralized": CENTRALIZED}, **{field: value}))

    with pytest.raises(MergeError, match=rf"b\.json: field '{field}' differs"):
        merge_quality_results(into, [other])
    assert into.read_bytes() == before


def test_a_different_untrained_score_is_refused(tmp_path: Path) -> None:
    into = _write(tmp_path / "a.json", _part({"fedavg": FEDAVG}))
    round0 = {"gold_accuracy": 0.0, "gold_category_accuracy": 0.0, "gold_loss": 4.7}
    other = _write(tmp_path / "b.json", _part({"centralized": CENTRALIZED}, round0=round0))

    with pytest.raises(MergeError, match="round0"):
        merge_quality_results(into, [other])


def test_the_untrained_score_may_differ_in_the_last_bits(tmp_path: Path) -> None:
    into = _write(tmp_path / "a.json", _part({"fedavg": FEDAVG}))
    round0 = {"gold_accuracy": 0.0, "gold_category_accuracy": 0.0, "gold_loss": 4.62 + 1e-12}
    other = _write(tmp_path / "b.json", _part({"centralized": CENTRALIZED}, round0=round0))

    assert "centralized" in merge_quality_results(into, [other])["algorithms"]


def test_an_algorithm_measured_twice_is_refused_naming_both_files(tmp_path: Path) -> None:
    into = _write(tmp_path / "a.json", _part({"fedavg": FEDAVG}))
    other_fedavg = copy.deepcopy(FEDAVG)
    other_fedavg["per_round"][-1]["gold_category_accuracy"] = 0.45
    other = _write(tmp_path / "b.json", _part({"fedavg": other_fedavg}))

    twice = r"b\.json: algorithm 'fedavg' is also measured in .*a\.json"
    with pytest.raises(MergeError, match=twice):
        merge_quality_results(into, [other])


def test_merging_the_target_into_itself_or_nothing_is_refused(tmp_path: Path) -> None:
    into = _write(tmp_path / "a.json", _part({"fedavg": FEDAVG}))

    with pytest.raises(MergeError, match="nothing to merge"):
        merge_quality_results(into, [])
    with pytest.raises(MergeError, match="target itself"):
        merge_quality_results(into, [into])


def test_the_command_merges_and_updates_the_summary_entry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    into = _write(
        tmp_path / "quality-x-seed1.json",
        {**_part({"fedavg": FEDAVG}), "command": "fedsilo bench quality --seed 1"},
    )
    other = _write(tmp_path / "central.json", _part({"centralized": CENTRALIZED}))
    summary = tmp_path / "summary.json"

    assert main(["bench", "merge", str(into), str(other), "--summary", str(summary)]) == 0

    entry = json.loads(summary.read_text())["tasks"]["x"]
    assert entry["results_files"] == [str(into)]
    parts = json.loads(into.read_text())["merged_from"]
    assert [part["command"] for part in parts] == ["fedsilo bench quality --seed 1", None]
    assert set(entry["algorithms"]) == {"fedavg", "centralized"}
    assert "algorithms ['centralized', 'fedavg']" in capsys.readouterr().out


def test_the_command_drops_the_summary_entry_a_merged_part_wrote_for_itself(
    tmp_path: Path,
) -> None:
    # The part's own run (`bench quality --results central.json`) wrote an entry "central".
    into = _write(tmp_path / "quality-x.json", _part({"fedavg": FEDAVG}))
    other = _write(tmp_path / "central.json", _part({"centralized": CENTRALIZED}))
    summary = tmp_path / "summary.json"
    update_summary(summary, "central", [other])

    assert main(["bench", "merge", str(into), str(other), "--summary", str(summary)]) == 0

    assert list(json.loads(summary.read_text())["tasks"]) == ["x"]


def test_the_command_reports_a_refused_merge_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    into = _write(tmp_path / "a.json", _part({"fedavg": FEDAVG}))
    before = into.read_bytes()
    other = _write(tmp_path / "b.json", _part({"fedavg": FEDAVG}))
    summary = tmp_path / "summary.json"

    assert main(["bench", "merge", str(into), str(other), "--summary", str(summary)]) == 2

    assert "algorithm 'fedavg' is also measured" in capsys.readouterr().err
    assert into.read_bytes() == before
    assert not summary.exists()


def test_parts_from_another_cpu_merge_only_when_asked_and_keep_each_start(tmp_path: Path) -> None:
    into = _write(tmp_path / "a.json", _part({"fedavg": FEDAVG}))
    round0 = {"gold_accuracy": 0.0, "gold_category_accuracy": 0.0, "gold_loss": 4.591}
    other = _write(tmp_path / "b.json", _part({"centralized": CENTRALIZED}, round0=round0))
    with pytest.raises(MergeError, match="--other-cpu"):
        merge_quality_results(into, [other])

    merged = merge_quality_results(into, [other], other_cpu=True)

    assert merged["round0_differs"] is True
    assert merged["round0"]["gold_loss"] == 4.62  # the target's own start
    starts = {tuple(p["algorithms"]): p["round0"]["gold_loss"] for p in merged["merged_from"]}
    assert starts == {("fedavg",): 4.62, ("centralized",): 4.591}


def test_other_cpu_still_refuses_another_benchmark(tmp_path: Path) -> None:
    into = _write(tmp_path / "a.json", _part({"fedavg": FEDAVG}))
    other = _write(tmp_path / "b.json", _part({"centralized": CENTRALIZED}, gold_count=100))

    with pytest.raises(MergeError, match="gold_count"):
        merge_quality_results(into, [other], other_cpu=True)


def test_parts_with_one_start_are_not_marked_as_differing(tmp_path: Path) -> None:
    into = _write(tmp_path / "a.json", _part({"fedavg": FEDAVG}))
    other = _write(tmp_path / "b.json", _part({"centralized": CENTRALIZED}))

    assert merge_quality_results(into, [other], other_cpu=True)["round0_differs"] is False


def test_a_part_that_ran_one_mu_of_the_grid_merges(tmp_path: Path) -> None:
    grid = {"num_sites": 8, "rounds": 2, "seed": 0, "proximal_mus": [0.01, 0.1]}
    into = _write(tmp_path / "a.json", _part({"fedavg": FEDAVG}, budget=grid))
    one = {**grid, "proximal_mus": [0.01]}
    part = _write(tmp_path / "b.json", _part({"fedprox-mu0.01": FEDAVG}, budget=one))

    merged = merge_quality_results(into, [part])

    assert "fedprox-mu0.01" in merged["algorithms"]
    assert merged["budget"]["proximal_mus"] == [0.01, 0.1]


def test_a_mu_outside_the_grid_is_another_benchmark(tmp_path: Path) -> None:
    grid = {"num_sites": 8, "rounds": 2, "seed": 0, "proximal_mus": [0.01, 0.1]}
    into = _write(tmp_path / "a.json", _part({"fedavg": FEDAVG}, budget=grid))
    other = {**grid, "proximal_mus": [1.0]}
    part = _write(tmp_path / "b.json", _part({"fedprox-mu1": FEDAVG}, budget=other))

    with pytest.raises(MergeError, match="'budget' differs"):
        merge_quality_results(into, [part])
