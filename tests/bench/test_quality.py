"""The quality benchmark on the tiny model: every algorithm, one round, results written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedsilo.bench.quality import QualityRequest, run_quality_benchmark, summarize_goals
from fedsilo.bench.settings import QualityBudget


@pytest.fixture(scope="module")
def results(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("quality")
    budget = QualityBudget(
        num_sites=2,
        rounds=1,
        local_steps=1,
        batch_size=2,
        examples_per_site=4,
        gold_size=4,
        lora_rank=2,
        proximal_mus=(0.1,),
        edge_cases_per_kind=2,
    )
    request = QualityRequest(
        task="icd10-alpha1",
        model=str(tiny_model_dir),
        out_dir=out / "runs",
        results_path=out / "quality.json",
        budget=budget,
        say=lambda _line: None,
    )
    run_quality_benchmark(request)
    data: dict = json.loads((out / "quality.json").read_text())
    return data


def test_every_algorithm_runs_one_round(results: dict) -> None:
    algorithms = results["algorithms"]

    assert set(algorithms) == {
        "centralized",
        "local",
        "fedavg",
        "fedprox-mu0.1",
        "fedadam",
        "ffa-lora",
    }
    for name in ("centralized", "fedavg", "fedprox-mu0.1", "fedadam", "ffa-lora"):
        assert [row["round"] for row in algorithms[name]["per_round"]] == [1]
    assert len(algorithms["local"]["per_site"]) == 2


def test_budget_is_the_same_for_all(results: dict) -> None:
    algorithms = results["algorithms"]

    # 2 sites x 1 round x 1 step x 2 examples, pooled or not.
    assert algorithms["centralized"]["examples_seen"] == 4
    assert algorithms["centralized"]["optimizer_steps"] == 2
    assert algorithms["fedavg"]["examples_seen"] == 4
    assert algorithms["local"]["optimizer_steps_per_site"] == 1


def test_only_federated_algorithms_send_adapters_and_ffa_sends_less(results: dict) -> None:
    algorithms = results["algorithms"]

    assert algorithms["centralized"]["bytes_up_per_site"] == 0
    assert algorithms["local"]["bytes_up_per_site"] == 0
    assert algorithms["centralized"]["raw_record_bytes_moved_per_site"] > 0
    full = algorithms["fedavg"]["bytes_up_per_site"]
    assert full > 0
    assert 0 < algorithms["ffa-lora"]["bytes_up_per_site"] < full


def test_edge_cases_are_scored_for_each_final_adapter(results: dict) -> None:
    edge = results["edge_cases"]

    kinds = {"rare-code", "near-duplicate", "unseen-chapter", "adversarial", "long-input", "empty"}
    assert set(edge["sizes"]) == kinds
    for name in ("centralized", "fedavg", "ffa-lora"):
        assert set(edge[name]) == kinds
        assert edge[name]["empty"]["accuracy"] is None


def test_goals_compare_with_centralized_and_local() -> None:
    algorithms = {
        "centralized": {
            "per_round": [{"gold_accuracy": 0.5, "gold_category_accuracy": 0.0, "gold_loss": 1.0}]
        },
        "local": {
            "final_mean": {"gold_accuracy": 0.1, "gold_category_accuracy": 0.2, "gold_loss": 2.5}
        },
        "fedavg": {
            "per_round": [{"gold_accuracy": 0.4, "gold_category_accuracy": 0.3, "gold_loss": 2.0}]
        },
    }

    goals = summarize_goals(algorithms, {"gold_loss": 3.0})

    row = goals["fedavg"]
    assert row["gold_accuracy_vs_centralized"] == pytest.approx(0.8)
    assert row["gold_category_accuracy_vs_centralized"] is None  # centralized scored 0
    assert row["gold_accuracy_minus_local_mean"] == pytest.approx(0.3)
    assert row["gold_loss_reduction_vs_centralized"] == pytest.approx(0.5)
    assert row["gold_loss_minus_local_mean"] == pytest.approx(-0.5)
    assert set(goals) == {"fedavg"}


def test_unknown_task_or_algorithm_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown algorithm"):
        run_quality_benchmark(
            QualityRequest("icd10-alpha1", "m", tmp_path, tmp_path / "r.json", algorithms=("x",))
        )
    with pytest.raises(ValueError, match="unknown task"):
        run_quality_benchmark(QualityRequest("mnist", "m", tmp_path, tmp_path / "r.json"))
