"""benchmarks/distill_quality.py: the demo's shape, the clusters, the gold split and the goal."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

from fedsilo.config.load import parse_config
from fedsilo.data.tasks import build_task

from . import benchmark_script


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return benchmark_script("distill_quality")


def test_federation_follows_the_demo_with_the_benchmarks_overrides(bench: ModuleType) -> None:
    demo = tomllib.loads(bench.DEMO.read_text(encoding="utf-8"))
    federation = bench.federation_config()
    for section in ("task", "train", "lora", "model"):
        assert federation[section] == demo[section]
    assert federation["run"]["rounds"] == demo["run"]["rounds"]
    assert federation["run"]["torch_threads"] == 1
    assert federation["strategy"]["min_sites"] == 2
    assert federation["evaluation"]["every_rounds"] == demo["run"]["rounds"]
    config = parse_config(federation, source="test")
    assert not config.scores_gold_after(1)
    assert config.scores_gold_after(config.run.rounds)


def test_smoke_budget_is_small_and_valid(bench: ModuleType) -> None:
    federation = bench.federation_config(model="some/folder", smoke=True)
    config = parse_config(federation, source="test")
    assert config.model.base == "some/folder"
    assert config.run.rounds == config.evaluation.every_rounds == 2
    assert config.task.examples_per_site != "all"
    assert config.task.examples_per_site < 300


def test_clusters_name_the_demo_tasks_sites(
    bench: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    federation = bench.federation_config(smoke=True)
    bench.check_clusters(federation)
    monkeypatch.setitem(bench.CLUSTERS, "endo-musculoskeletal", ["endocrinology"])
    with pytest.raises(SystemExit, match="orthopedics"):
        bench.check_clusters(federation)


def test_cluster_tasks_partition_every_gold_part(bench: ModuleType) -> None:
    config = parse_config(bench.federation_config(smoke=True), source="test")
    whole = build_task(config.task, seed=config.run.seed)
    domains = {
        name: build_task(config.task.model_copy(update={"only_sites": tuple(sites)}), seed=0)
        for name, sites in bench.CLUSTERS.items()
    }
    bench.check_partition(whole, domains)
    assert all(task.gold and task.phrasings and task.ranking for task in domains.values())
    short = dataclasses.replace(whole, ranking=whole.ranking[1:])
    with pytest.raises(SystemExit, match="ranking"):
        bench.check_partition(short, domains)


def test_pooled_figures_are_count_weighted(bench: ModuleType) -> None:
    pooled = bench.pooled(
        [
            {"count": 1, "category_accuracy": 1.0, "loss": 1.0, "category_accuracy_ci95": [1, 1]},
            {"count": 3, "category_accuracy": 0.0, "loss": 2.0, "category_accuracy_ci95": [0, 0]},
        ]
    )
    assert pooled == {"count": 4, "category_accuracy": 0.25, "loss": 1.75}


def test_goal_is_read_on_category_accuracy(bench: ModuleType) -> None:
    def figures(category: float, exact: float, loss: float) -> dict[str, float]:
        return {"category_accuracy": category, "accuracy": exact, "loss": loss}

    scores = {
        "base": {d: figures(0.0, 0.0, 3.0) for d in bench.CLUSTERS},
        "master": {"cardio-pulmonary": figures(0.18, 0.0, 2.0)}
        | {"endo-musculoskeletal": figures(0.20, 0.05, 2.0)},
        "expert:cardio-pulmonary": {"cardio-pulmonary": figures(0.2, 0.0, 1.0)},
        "expert:endo-musculoskeletal": {"endo-musculoskeletal": figures(0.2, 0.1, 1.0)},
    }
    rows = bench.goal_rows(scores)
    cardio, endo = rows["cardio-pulmonary"], rows["endo-musculoskeletal"]
    assert cardio["category_accuracy_retained"] == pytest.approx(0.9)
    assert cardio["goal_met"] is False
    assert cardio["accuracy_retained"] is None  # the expert's exact match is 0
    assert cardio["loss_gain_kept"] == pytest.approx(0.5)
    assert endo["category_accuracy_retained"] == pytest.approx(1.0)
    assert endo["goal_met"] is True
    assert endo["accuracy_retained"] == pytest.approx(0.5)


@pytest.mark.slow
def test_smoke_run_scores_every_model_on_every_domain(
    bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "distill.json"
    argv = ["distill_quality.py", "--smoke", "--work", str(tmp_path / "w"), "--out", str(out)]
    monkeypatch.setattr("sys.argv", argv)
    bench.main()
    result = json.loads(out.read_text())
    domains = [*bench.CLUSTERS, "all"]
    assert set(result["scores"]) == {
        "base", "master", "master-best-expert", "single",
        *(f"expert:{name}" for name in bench.CLUSTERS),
    }  # fmt: skip
    for scores in result["scores"].values():
        assert list(scores) == domains
        assert set(scores["all"]["parts"]) == {"unseen-code", "phrasing", "ranking"}
        assert scores["all"]["count"] == sum(scores[d]["count"] for d in bench.CLUSTERS)
    assert set(result["goal"]) == set(bench.CLUSTERS)
    section = "\n".join(benchmark_script("report_distill").distill_section(result))
    assert "category accuracy on unseen codes (a)" in section
    assert "| **master (distilled)** |" in section


def test_report_asks_to_rerun_a_result_from_the_old_gold() -> None:
    old = {"measured_at": "2026-12-01T07:07:29Z", "goal_retained": 0.95, "scores": {}}
    section = "\n".join(benchmark_script("report_distill").distill_section(old))
    assert "predates the ICD-10 gold standard" in section
