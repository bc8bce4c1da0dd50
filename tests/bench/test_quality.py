"""The quality benchmark on the tiny model: every algorithm, one round, results written."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from fedsilo.bench.pooled_checkpoint import CheckpointMismatchError
from fedsilo.bench.quality import (
    QualityRequest,
    ResumeError,
    run_quality_benchmark,
    summarize_goals,
)
from fedsilo.bench.settings import QualityBudget
from fedsilo.model.adapters import load_adapter
from fedsilo.training.precision import cpu_model


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


def test_the_results_name_the_cpu_they_were_measured_on(results: dict) -> None:
    # Untrained scores differ in the last digits between CPU models: a merge needs to know.
    assert results["machine"]["cpu_model"] == cpu_model()


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


def _small_request(model: Path, out: Path, **changes: object) -> QualityRequest:
    budget = QualityBudget(
        num_sites=2, rounds=1, local_steps=1, batch_size=2, examples_per_site=4, gold_size=4,
        lora_rank=2, proximal_mus=(0.1,), edge_cases_per_kind=2,
    )  # fmt: skip
    fields: dict = {
        "task": "icd10-alpha1",
        "model": str(model),
        "out_dir": out / "runs",
        "results_path": out / "quality.json",
        "budget": budget,
        "algorithms": ("centralized", "fedavg"),
        "say": lambda _line: None,
    }
    fields.update(changes)
    return QualityRequest(**fields)  # type: ignore[arg-type]


def test_a_stopped_benchmark_keeps_what_it_measured_and_resumes(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedsilo.bench.quality as quality

    real_federated = quality._federated

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("power cut")

    monkeypatch.setattr(quality, "_federated", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        run_quality_benchmark(_small_request(tiny_model_dir, tmp_path))

    partial = json.loads((tmp_path / "quality.json").read_text())
    assert partial["complete"] is False
    assert set(partial["algorithms"]) == {"centralized"}
    assert set(partial["edge_cases"]) == {"sizes", "centralized"}

    def no_centralized(*args: object, **kwargs: object) -> None:
        raise AssertionError("centralized was measured already")

    # As if another process had measured a part (fedsilo bench merge): a resume keeps the record.
    parts = [{"results": "other.json", "algorithms": ["centralized"]}]
    (tmp_path / "quality.json").write_text(json.dumps({**partial, "merged_from": parts}))
    monkeypatch.setattr(quality, "_federated", real_federated)
    monkeypatch.setattr(quality, "_centralized", no_centralized)
    resumed = run_quality_benchmark(_small_request(tiny_model_dir, tmp_path, resume=True))

    assert resumed["complete"] is True
    assert resumed["algorithms"]["centralized"] == partial["algorithms"]["centralized"]
    assert [r["round"] for r in resumed["algorithms"]["fedavg"]["per_round"]] == [1]
    assert set(resumed["edge_cases"]) == {"sizes", "centralized", "fedavg"}
    assert set(resumed["goals"]) == {"fedavg"}
    assert resumed["merged_from"] == parts


def test_a_federation_stopped_midway_goes_on_from_its_checkpoint(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    first = run_quality_benchmark(_small_request(tiny_model_dir, tmp_path, algorithms=("fedavg",)))
    # As if the process died after the federation finished but before its result was written.
    results = tmp_path / "quality.json"
    data = json.loads(results.read_text())
    data["algorithms"], data["complete"] = {}, False
    results.write_text(json.dumps(data))

    resumed = run_quality_benchmark(
        _small_request(tiny_model_dir, tmp_path, algorithms=("fedavg",), resume=True)
    )

    assert (
        resumed["algorithms"]["fedavg"]["per_round"] == first["algorithms"]["fedavg"]["per_round"]
    )
    with pytest.raises(FileExistsError, match="--resume"):
        run_quality_benchmark(_small_request(tiny_model_dir, tmp_path, algorithms=("fedavg",)))


def _three_rounds() -> QualityBudget:
    return QualityBudget(num_sites=2, rounds=3, local_steps=1, batch_size=2,
                         examples_per_site=4, gold_size=4, lora_rank=2)  # fmt: skip


def _cut_and_resumed(
    model: Path, out: Path, monkeypatch: pytest.MonkeyPatch, *, stop_at: int, **changes: object
) -> tuple[dict, int]:
    """Run the benchmark into ``out`` with a power cut at the ``stop_at``-th local round it
    trains; check that a rerun without --resume is refused; resume. Returns the resumed
    result and how many local rounds the resume trained."""
    import fedsilo.bench.quality as quality

    real_round = quality._Trainer.train_round
    trained: list[int] = []
    cut_at = [stop_at]

    def counted(self: object, *args: object, **kwargs: object) -> object:
        trained.append(1)
        if len(trained) == cut_at[0]:
            raise RuntimeError("power cut")
        return real_round(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(quality._Trainer, "train_round", counted)
    with pytest.raises(RuntimeError, match="power cut"):
        run_quality_benchmark(_small_request(model, out, **changes))
    with pytest.raises(FileExistsError, match="--resume"):
        run_quality_benchmark(_small_request(model, out, **changes))
    trained.clear()
    cut_at[0] = 0
    resumed = run_quality_benchmark(_small_request(model, out, resume=True, **changes))
    return resumed, len(trained)


def test_a_centralized_baseline_stopped_midway_goes_on_from_its_last_round(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    central = {"algorithms": ("centralized",), "budget": _three_rounds(), "edge_cases": False}
    whole = run_quality_benchmark(_small_request(tiny_model_dir, tmp_path / "whole", **central))

    resumed, trained = _cut_and_resumed(
        tiny_model_dir, tmp_path / "cut", monkeypatch, stop_at=3, **central
    )

    assert trained == 1  # round 3 only
    assert resumed["algorithms"]["centralized"]["resumed_after_round"] == 2

    def curve(result: dict) -> list[dict]:
        rows = result["algorithms"]["centralized"]["per_round"]
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]

    assert [row["round"] for row in curve(resumed)] == [1, 2, 3]
    assert curve(resumed) == curve(whole)
    adapters = [
        load_adapter(folder / "runs" / "centralized" / "adapter-round-3.safetensors")
        for folder in (tmp_path / "whole", tmp_path / "cut")
    ]
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])


def test_a_local_only_baseline_stopped_midway_keeps_its_finished_sites(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = {"algorithms": ("local",), "edge_cases": False}
    whole = run_quality_benchmark(_small_request(tiny_model_dir, tmp_path / "whole", **local))

    # One round of one step per site in this budget: the second call is the second site.
    resumed, trained = _cut_and_resumed(
        tiny_model_dir, tmp_path / "cut", monkeypatch, stop_at=2, **local
    )

    assert trained == 1  # the second site only
    assert resumed["algorithms"]["local"] == whole["algorithms"]["local"]
    other = _small_request(
        tiny_model_dir, tmp_path / "cut", budget=_three_rounds(), resume=True,
        results_path=tmp_path / "other.json", **local,
    )  # fmt: skip
    with pytest.raises(CheckpointMismatchError, match=r"local/progress\.json: field 'budget'"):
        run_quality_benchmark(other)


def test_a_centralized_checkpoint_of_another_budget_is_refused_naming_the_field(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    run_quality_benchmark(
        _small_request(tiny_model_dir, tmp_path, algorithms=("centralized",), edge_cases=False)
    )

    other = _small_request(
        tiny_model_dir, tmp_path, algorithms=("centralized",), edge_cases=False,
        budget=_three_rounds(), results_path=tmp_path / "other.json", resume=True,
    )  # fmt: skip

    with pytest.raises(CheckpointMismatchError, match=r"progress\.json: field 'budget' differs"):
        run_quality_benchmark(other)


def test_resume_refuses_results_of_another_budget_naming_the_field(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    run_quality_benchmark(_small_request(tiny_model_dir, tmp_path, algorithms=("centralized",)))
    other = QualityBudget(num_sites=2, rounds=2, local_steps=1, batch_size=2,
                          examples_per_site=4, gold_size=4, lora_rank=2)  # fmt: skip

    with pytest.raises(ResumeError, match=r"quality\.json: field 'budget' differs"):
        run_quality_benchmark(_small_request(tiny_model_dir, tmp_path, budget=other, resume=True))


def test_a_run_resumes_whether_or_not_it_started_compiled(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # How a process computes (device, torch.compile) is recorded under "machine", not in the
    # identity a resume must match: a run started eager may go on compiled.
    request = _small_request(tiny_model_dir, tmp_path, algorithms=("centralized",))
    first = run_quality_benchmark(request)
    assert "compile" not in first["train"] and "device" not in first["train"]
    assert first["machine"]["compiled_plain_training"] in (True, False)

    resumed = run_quality_benchmark(dataclasses.replace(request, resume=True))

    assert resumed["algorithms"]["centralized"] == first["algorithms"]["centralized"]
