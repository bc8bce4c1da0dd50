"""The converged-budget protocol of the quality benchmark, on the tiny model: the schedule and
local epochs applied alike everywhere, the validation split, the sweep, seeds and summary."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import fedsilo.bench.quality as quality
from fedsilo.bench.quality import QualityRequest, ResumeError, run_quality_benchmark
from fedsilo.bench.settings import QualityBudget
from fedsilo.bench.summary import (
    seed_family_base,
    seed_results_files,
    seed_results_path,
    summarize_seeds,
    summary_label,
    t_interval,
    t_quantile_975,
    update_summary,
)
from fedsilo.bench.sweep import SweepRequest, chosen_budget, hyperparameters_record, run_sweep
from fedsilo.config import TaskSection
from fedsilo.data.tasks import build_task
from fedsilo.ledger.entries import EntryKind
from fedsilo.ledger.store import read_entries
from fedsilo.protocol.schedule import round_learning_rate

SMALL = QualityBudget(
    num_sites=2, rounds=1, local_steps=1, batch_size=2, examples_per_site=4, gold_size=4,
    lora_rank=2, proximal_mus=(0.1,), edge_cases_per_kind=2,
)  # fmt: skip


def _request(model: Path, out: Path, budget: QualityBudget, **changes: Any) -> QualityRequest:
    fields: dict[str, Any] = {
        "task": "icd10-alpha1",
        "model": str(model),
        "out_dir": out / "runs",
        "results_path": out / "quality.json",
        "budget": budget,
        "algorithms": ("centralized", "local", "fedavg"),
        "edge_cases": False,
        "say": lambda _line: None,
    }
    fields.update(changes)
    return QualityRequest(**fields)


def test_schedule_and_epochs_are_applied_alike_to_centralized_local_and_federated(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    budget = dataclasses.replace(
        SMALL, rounds=3, local_epochs=1.0, examples_per_site=5, lr_schedule="cosine",
        warmup_rounds=1, learning_rate=0.004,
    )  # fmt: skip
    calls: list[tuple[int, float]] = []
    real = quality.train_plain

    def recording(*args: Any, **kwargs: Any) -> Any:
        calls.append((kwargs["steps"], kwargs["learning_rate"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(quality, "train_plain", recording)
    results = run_quality_benchmark(_request(tiny_model_dir, tmp_path, budget))

    expected = [
        round_learning_rate(0.004, round_number=r, rounds=3, schedule="cosine", warmup_rounds=1)
        for r in (1, 2, 3)
    ]
    assert expected[0] < expected[1] > expected[2]  # warmup then decay, not constant
    sent = [
        entry.payload["task"]
        for entry in read_entries(tmp_path / "runs" / "fedavg" / "ledger.db")
        if entry.kind is EntryKind.TASK_SENT
    ]
    by_round: dict[int, set[float]] = {}
    for task in sent:
        by_round.setdefault(task["round"], set()).add(task["learning_rate"])
        assert (task["local_steps"], task["local_epochs"]) == (0, 1.0)
    assert [by_round[r] for r in (1, 2, 3)] == [{rate} for rate in expected]

    # Each site takes ceil(examples / batch) steps per epoch; centralized takes their sum.
    site_steps = [-(-n // 2) for n in results["sites"].values()]
    centralized_calls, local_calls = calls[:3], calls[3:]
    assert centralized_calls == [(sum(site_steps), rate) for rate in expected]
    assert local_calls == [(steps, rate) for steps in site_steps for rate in expected]
    algorithms = results["algorithms"]
    assert [row["learning_rate"] for row in algorithms["centralized"]["per_round"]] == expected
    assert [row["learning_rate"] for row in algorithms["fedavg"]["per_round"]] == expected
    assert algorithms["centralized"]["examples_seen"] == algorithms["fedavg"]["examples_seen"]


def _sites_of(section: TaskSection, seed: int) -> list[set[Any]]:
    return [set(site.records) for site in build_task(section, seed=seed).sites]


def test_validation_split_is_drawn_from_the_sites_disjoint_from_training_and_gold() -> None:
    section = TaskSection(
        name="icd10", num_sites=3, examples_per_site=20, gold_size=12, gold_phrasings=8,
        train_on_inclusion_terms=True, validation_share=0.25,
    )  # fmt: skip
    task = build_task(section, seed=3)
    whole = _sites_of(section.model_copy(update={"validation_share": 0.0}), seed=3)

    validation = set(task.validation)
    assert len(validation) == len(task.validation) >= 3
    trained = set().union(*(set(site.records) for site in task.sites))
    assert validation.isdisjoint(trained)
    gold_prompts = {r.prompt for r in (*task.gold, *task.phrasings)}
    assert gold_prompts.isdisjoint(r.prompt for r in validation)
    # Drawn from the sites' own records: together they are what each site had.
    for site, records in zip(task.sites, whole, strict=True):
        held = records - set(site.records)
        assert held and held <= validation
        assert set(site.records) | held == records
    assert build_task(section, seed=3).validation == task.validation  # deterministic
    assert build_task(section, seed=4).validation != task.validation
    assert build_task(section.model_copy(update={"validation_share": 0.0}), seed=3).validation == ()


def _fake(seed: int, task: str, central: float, fedavg: list[float], local: tuple) -> dict:
    key = "gold_category_accuracy" if task == "icd10" else "gold_accuracy"
    rows = [{"round": r + 1, key: v} for r, v in enumerate(fedavg)]
    central_rows = [{"round": 1, key: central / 2}, {"round": 2, key: central}]
    return {
        "task": f"{task}-x",
        "model": "m",
        "budget": {"seed": seed, "rounds": len(fedavg)},
        "task_settings": {"name": task},
        "metric_meaning": {key: "meaning"},
        "algorithms": {
            "centralized": {"per_round": central_rows},
            "fedavg": {"per_round": rows},
            "local": {"final_mean": {key: local[0]}, "final_worst": {key: local[1]}},
        },
    }  # fmt: skip


def test_summary_over_seeds_gives_mean_t_interval_and_ratio() -> None:
    per_seed = {
        0: _fake(0, "icd10", 0.50, [0.2, 0.40], (0.20, 0.10)),
        1: _fake(1, "icd10", 0.60, [0.3, 0.45], (0.25, 0.05)),
        2: _fake(2, "icd10", 0.70, [0.4, 0.65], (0.30, 0.00)),
    }

    summary = summarize_seeds(per_seed)

    assert summary["headline"] == "gold_category_accuracy"
    fedavg = summary["algorithms"]["fedavg"]
    assert fedavg["seeds"] == [0, 1, 2]
    assert fedavg["values"] == [0.40, 0.45, 0.65]
    assert fedavg["mean"] == pytest.approx(0.5)
    half = 4.303 * 0.13228756555322952 / 3**0.5  # t(0.975, 2) * sd / sqrt(3)
    assert fedavg["ci95"] == pytest.approx([0.5 - half, 0.5 + half])
    assert fedavg["ratio_to_centralized"] == pytest.approx(0.5 / 0.6)
    assert fedavg["curve_mean"] == [[1, pytest.approx(0.3)], [2, pytest.approx(0.5)]]
    assert summary["algorithms"]["centralized"]["ratio_to_centralized"] == pytest.approx(1.0)
    assert summary["algorithms"]["local-mean"]["mean"] == pytest.approx(0.25)
    assert summary["algorithms"]["local-worst"]["values"] == [0.10, 0.05, 0.00]
    assert "local" not in summary["algorithms"]
    # Another task's headline is its accuracy; one seed has no interval.
    other = summarize_seeds({5: _fake(5, "drug-review", 0.8, [0.4], (0.1, 0.0))})
    assert other["headline"] == "gold_accuracy"
    assert other["algorithms"]["fedavg"]["ci95"] is None
    assert other["algorithms"]["fedavg"]["ratio_to_centralized"] == pytest.approx(0.5)


def test_t_quantiles_match_the_t_distribution() -> None:
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 4, 9, 30):
        assert t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-3)
    assert t_interval([0.3]) is None
    assert t_interval([0.2, 0.2, 0.2]) == [pytest.approx(0.2), pytest.approx(0.2)]


def test_an_accuracy_interval_is_cut_to_the_range_an_accuracy_can_take() -> None:
    # Worst local sites of three seeds: the t-interval's lower end falls below zero.
    unbounded = t_interval([0.075, 0.005, 0.045])
    assert unbounded is not None and unbounded[0] < 0.0 < unbounded[1] < 1.0

    cut = t_interval([0.075, 0.005, 0.045], bounds=(0.0, 1.0))
    assert cut == [0.0, pytest.approx(unbounded[1])]
    assert t_interval([0.99, 0.95, 1.0], bounds=(0.0, 1.0)) == [
        pytest.approx(0.9143, abs=1e-4),
        1.0,
    ]


def test_summary_file_keeps_other_tasks_and_leaves_out_other_budgets(tmp_path: Path) -> None:
    paths = []
    for seed, central in ((0, 0.5), (1, 0.7)):
        path = tmp_path / f"q-seed{seed}.json"
        path.write_text(json.dumps(_fake(seed, "icd10", central, [0.3], (0.1, 0.0))))
        paths.append(path)
    stale = _fake(2, "icd10", 0.9, [0.9], (0.1, 0.0))
    stale["budget"]["rounds"] = 7
    (tmp_path / "stale.json").write_text(json.dumps(stale))
    summary_path = tmp_path / "summary.json"
    summary_path.write_text(json.dumps({"benchmark": "quality-summary", "tasks": {"x": {}}}))

    summary = update_summary(summary_path, "t", [*paths, tmp_path / "stale.json"])

    assert json.loads(summary_path.read_text()) == summary
    assert set(summary["tasks"]) == {"x", "t"}
    entry = summary["tasks"]["t"]
    assert entry["algorithms"]["centralized"]["seeds"] == [0, 1]
    assert entry["algorithms"]["centralized"]["mean"] == pytest.approx(0.6)
    assert entry["skipped_files"] == [str(tmp_path / "stale.json")]


def test_a_seed_given_twice_counts_once_and_the_second_file_is_listed_as_left_out(
    tmp_path: Path,
) -> None:
    first, again = tmp_path / "q.json", tmp_path / "q-seed1.json"
    first.write_text(json.dumps(_fake(1, "icd10", 0.5, [0.10], (0.1, 0.0))))
    again.write_text(json.dumps(_fake(1, "icd10", 0.5, [0.40], (0.1, 0.0))))

    entry = update_summary(tmp_path / "summary.json", "t", [first, again])["tasks"]["t"]

    assert entry["algorithms"]["fedavg"]["values"] == [0.10]
    assert entry["results_files"] == [str(first)]
    assert entry["skipped_files"] == [str(again)]


def test_summary_updates_from_processes_finishing_together_keep_every_entry(
    tmp_path: Path,
) -> None:
    results = tmp_path / "q.json"
    results.write_text(json.dumps(_fake(0, "icd10", 0.5, [0.3], (0.1, 0.0))))
    summary_path = tmp_path / "summary.json"
    code = (
        "import sys; from pathlib import Path; from fedsilo.bench.summary import update_summary\n"
        "for i in range(60):\n"
        "    update_summary(Path(sys.argv[1]), f'{sys.argv[2]}{i}', [Path(sys.argv[3])])\n"
    )
    writers = [
        subprocess.Popen([sys.executable, "-c", code, str(summary_path), task, str(results)])
        for task in ("a", "b", "c")
    ]

    assert [writer.wait(timeout=120) for writer in writers] == [0, 0, 0]
    # Each process adds a new entry with each update: an update lost to another is missing.
    expected = {f"{task}{i}" for task in ("a", "b", "c") for i in range(60)}
    assert set(json.loads(summary_path.read_text())["tasks"]) == expected


@pytest.mark.parametrize(
    ("argv", "written"),
    [
        (["--seed", "2"], "quality-icd10-seed2.json"),
        (["--seed", "0"], "quality-icd10.json"),
        (["--seeds", "0", "3"], "quality-icd10-seed3.json quality-icd10.json"),
    ],
)
def test_each_seed_of_the_cli_writes_its_own_results_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str], written: str
) -> None:
    from fedsilo.cli.main import main

    def fake_benchmark(request: quality.QualityRequest) -> dict[str, Any]:
        data = _fake(request.budget.seed, "icd10", 0.5, [0.3], (0.1, 0.0))
        request.results_path.write_text(json.dumps(data))
        return data

    monkeypatch.setattr(quality, "run_quality_benchmark", fake_benchmark)
    base = tmp_path / "quality-icd10.json"
    summary = tmp_path / "summary.json"
    common = ["bench", "quality", "--task", "icd10-by-specialty", "--summary", str(summary)]

    assert main([*common, "--results", str(base), *argv, "--out", str(tmp_path / "runs")]) == 0
    assert " ".join(sorted(p.name for p in tmp_path.glob("quality-*.json"))) == written
    # A seed's own file named with another seed is refused before anything runs.
    mismatched = ["--results", str(tmp_path / "quality-icd10-seed4.json"), "--seed", "5"]
    assert main([*common, *mismatched]) == 2


def test_sweep_chooses_on_validation_never_gold_and_the_benchmark_records_it(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    budget = dataclasses.replace(SMALL, examples_per_site=6, validation_share=0.34)
    request = _request(
        tiny_model_dir, tmp_path, budget, algorithms=("centralized", "local", "fedavg", "fedprox"),
        results_path=tmp_path / "sweep.json",
    )  # fmt: skip

    def no_gold(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the sweep scored a gold set")

    with monkeypatch.context() as patch:
        patch.setattr(quality._Trainer, "evaluate", no_gold)
        sweep = run_sweep(SweepRequest(request, (1e-4, 0.05), proximal_mus=(0.01, 1.0)))

    assert sweep["complete"] is True
    assert sweep["learning_rate_grid"] == [1e-4, 0.05]
    assert sweep["mu_grid"] == [0.01, 1.0]
    assert sweep["validation_count"] == 2 * 2  # round(0.34 * 6) of each site's 6 records
    chosen = sweep["chosen"]
    for name in ("centralized", "local", "fedavg"):
        points = sweep["points"][name]
        assert set(points) == {"0.0001", "0.05"}
        best = min(points, key=lambda k: points[k]["validation_loss"])
        assert chosen["learning_rates"][name] == float(best)
    assert chosen["learning_rates"]["fedprox"] == chosen["learning_rates"]["fedavg"]
    mus = sweep["fedprox_points"]
    assert chosen["proximal_mu"] == float(min(mus, key=lambda k: mus[k]["validation_loss"]))

    tuned = chosen_budget(budget, sweep)
    results = run_quality_benchmark(
        _request(
            tiny_model_dir, tmp_path, tuned, algorithms=("centralized",),
            results_path=tmp_path / "quality.json",
            hyperparameters=hyperparameters_record(sweep, tmp_path / "sweep.json"),
        )
    )  # fmt: skip

    assert (
        results["algorithms"]["centralized"]["learning_rate"]
        == (chosen["learning_rates"]["centralized"])
    )
    assert results["hyperparameters"]["chosen"] == chosen
    assert results["hyperparameters"]["learning_rate_grid"] == [1e-4, 0.05]
    assert results["validation_count"] == 4
    with pytest.raises(ValueError, match="validation split"):
        run_sweep(SweepRequest(_request(tiny_model_dir, tmp_path, SMALL), (1e-3,), ()))


def test_bench_quality_runs_each_seed_and_writes_the_summary(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedsilo.cli.main import main

    monkeypatch.chdir(tmp_path)
    results = tmp_path / "quality-icd10-alpha1-many-steps.json"
    common = ["bench", "quality", "--task", "icd10-alpha1", "--model", str(tiny_model_dir)]
    common += ["--sites", "2", "--rounds", "1", "--local-epochs", "0.5", "--batch-size", "2"]
    common += ["--examples-per-site", "4", "--gold-size", "4", "--lora-rank", "2"]
    common += ["--algorithms", "centralized,local", "--no-edge-cases", "--results", str(results)]
    common += ["--out", str(tmp_path / "runs"), "--seeds", "0", "1"]

    assert main(common) == 0

    first = json.loads(results.read_text())
    second = json.loads((tmp_path / "quality-icd10-alpha1-many-steps-seed1.json").read_text())
    assert (first["budget"]["seed"], second["budget"]["seed"]) == (0, 1)
    assert first["train"]["local_epochs"] == 0.5
    summary = json.loads((tmp_path / "benchmarks/results/quality-summary.json").read_text())
    entry = summary["tasks"]["icd10-alpha1-many-steps"]
    assert set(entry["algorithms"]) == {"centralized", "local-mean", "local-worst"}
    assert entry["algorithms"]["centralized"]["seeds"] == [0, 1]
    assert entry["algorithms"]["centralized"]["values"] == [
        data["algorithms"]["centralized"]["per_round"][-1]["gold_category_accuracy"]
        for data in (first, second)
    ]

    # Resuming measures nothing again.
    monkeypatch.setattr(quality, "_centralized", lambda *a, **k: pytest.fail("re-measured"))
    assert main([*common, "--resume"]) == 0
    with pytest.raises(SystemExit, match="examples-per-site"):
        main([*common, "--examples-per-site", "some"])


def test_bench_quality_sweep_then_runs_with_the_choice(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedsilo.cli.main import main

    monkeypatch.chdir(tmp_path)
    results = tmp_path / "quality.json"
    args = ["bench", "quality", "--task", "icd10-by-specialty", "--model", str(tiny_model_dir)]
    args += ["--sites", "2", "--rounds", "1", "--local-steps", "1", "--batch-size", "2"]
    args += ["--examples-per-site", "6", "--gold-size", "4", "--lora-rank", "2"]
    args += ["--algorithms", "centralized,local", "--sweep-algorithms", "centralized"]
    args += ["--no-edge-cases", "--results", str(results), "--out", str(tmp_path / "runs")]
    args += ["--sweep", "--lr-grid", "0.0001", "0.05", "--validation-share", "0.34"]

    assert main(args) == 0

    sweep = json.loads((tmp_path / "quality-sweep.json").read_text())
    assert set(sweep["points"]) == {"centralized"}
    data = json.loads(results.read_text())
    chosen = sweep["chosen"]["learning_rates"]["centralized"]
    assert data["hyperparameters"]["chosen_by"] == "validation sweep"
    assert data["algorithms"]["centralized"]["learning_rate"] == chosen
    assert data["algorithms"]["local"]["learning_rate"] == QualityBudget().learning_rate

    # Resuming keeps the sweep's points and the measured algorithms.
    import fedsilo.bench.sweep as sweep_module

    monkeypatch.setattr(sweep_module, "_centralized_states", lambda *a, **k: pytest.fail("again"))
    monkeypatch.setattr(quality, "_centralized", lambda *a, **k: pytest.fail("re-measured"))
    assert main([*args, "--resume"]) == 0
    assert json.loads((tmp_path / "quality-sweep.json").read_text())["points"] == sweep["points"]


def test_report_shows_the_summary_over_seeds_and_draws_mean_curves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import quality_report

    monkeypatch.setattr(quality_report, "RESULTS", tmp_path)
    monkeypatch.setattr(quality_report, "IMAGES", tmp_path / "img")
    per_seed = {s: _fake(s, "icd10", 0.5, [0.2, 0.4 + 0.1 * s], (0.2, 0.1)) for s in (0, 1)}
    summary = {"tasks": {"icd10-by-specialty": summarize_seeds(per_seed)}}
    (tmp_path / "quality-summary.json").write_text(json.dumps(summary))

    text = "\n".join(quality_report.seed_summary_section())

    assert "| fedavg | 0, 1 | 45.0% |" in text
    assert "| local-worst | 0, 1 | 10.0% |" in text
    assert (tmp_path / "img" / "quality-icd10-by-specialty-curves-over-seeds.svg").exists()


def test_gold_every_rounds_scores_the_same_rounds_for_centralized_and_federated(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    budget = dataclasses.replace(SMALL, rounds=3, gold_every_rounds=2)
    results = run_quality_benchmark(
        _request(tiny_model_dir, tmp_path, budget, algorithms=("centralized", "fedavg"))
    )

    for name in ("centralized", "fedavg"):
        rounds = [row["round"] for row in results["algorithms"][name]["per_round"]]
        assert rounds == [2, 3], name
    federated = json.loads(json.dumps(results["algorithms"]["fedavg"]))
    metrics = Path(federated["run_dir"], "metrics.jsonl").read_text().splitlines()
    assert ["gold_accuracy" in json.loads(line) for line in metrics] == [True, False, True, True]


def test_server_momentum_reaches_every_fedavg_family_run_but_not_fedadam(tmp_path: Path) -> None:
    budget = dataclasses.replace(SMALL, server_momentum=0.7)
    config = quality.base_config(_request(tmp_path, tmp_path, budget))
    momenta = {
        name: variant.strategy.server_momentum
        for name, variant in quality.federated_configs(config, budget).items()
    }
    # FedAdam refuses server momentum (it has its own first moment).
    assert momenta == {"fedavg": 0.7, "fedprox-mu0.1": 0.7, "fedadam": 0.0, "ffa-lora": 0.7}


def test_report_summary_reads_each_task_on_its_headline_with_its_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import quality_report

    def final(exact: float, category: float) -> dict[str, Any]:
        last = {"gold_accuracy": exact, "gold_category_accuracy": category, "gold_loss": 1.0}
        return {"per_round": [{"round": 28, **last}]}

    data = {
        "task": "icd10-by-specialty",
        "task_settings": {"name": "icd10", "num_sites": 4, "examples_per_site": 600},
        "metric": "code",
        "metric_meaning": {"gold_accuracy": "exact", "gold_category_accuracy": "category"},
        "budget": {"rounds": 28, "batch_size": 8},
        "train": {"local_steps": 4},
        "gold_count": 200,
        "round0": {"gold_loss": 4.6},
        "algorithms": {
            "centralized": final(0.05, 0.53),
            "local": {"final_mean": {"gold_accuracy": 0.0, "gold_category_accuracy": 0.12,
                                     "gold_loss": 2.0}},
            "fedavg": final(0.015, 0.555),
        },
        "goals": {"fedavg": {"gold_category_accuracy_vs_centralized": 0.555 / 0.53}},
    }  # fmt: skip

    text = "\n".join(quality_report._summary({"icd10-by-specialty": data}))

    # The row reads category accuracy on gold part a (the headline), never exact match.
    row = "| `icd10-by-specialty` | category | 4 sites, 28 x 4 steps x 8, 600/site, gold 200 |"
    assert f"{row} 53.0% | 12.0% | 55.5% | not run | not run | not run |" in text


def test_report_reads_a_run_without_centralized_against_the_same_steps_split_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import quality_report

    def run(rounds: int, steps: int, finals: dict[str, float]) -> dict[str, Any]:
        return {
            "task": "icd10-by-specialty",
            "model": "m",
            "task_settings": {"name": "icd10"},
            "budget": {"seed": 0, "num_sites": 4, "examples_per_site": 600, "batch_size": 8,
                       "rounds": rounds},
            "train": {"local_steps": steps},
            "gold_count": 200,
            "algorithms": {
                name: {"per_round": [{"round": rounds, "gold_accuracy": 0.0,
                                      "gold_category_accuracy": value, "gold_loss": 1.0}]}
                for name, value in finals.items()
            },
        }  # fmt: skip

    short = run(28, 4, {"centralized": 0.5, "fedavg": 0.55})
    long = run(7, 16, {"fedavg": 0.4, "fedprox-mu1": 0.45})
    other_seed = {**short, "budget": {**short["budget"], "seed": 1}}
    loaded = {"a-seed1": other_seed, "a": short, "a-16": long}

    lines = quality_report._same_work_lines("a-16", long, loaded)

    assert lines[0] == (
        "The same seed, sites and records for the same 112 optimizer steps per site, split into "
        "28 rounds of 4 local steps (`a`): centralized 50.0%, fedavg 55.0%. Here, in 7 rounds "
        "of 16 local steps: fedavg 40.0% (80.0% of that centralized); fedprox-mu1 45.0% (90.0% "
        "of that centralized)."
    )
    assert quality_report._same_work_lines("a", short, loaded) == []


def _fedadam_sweep_request(tiny_model_dir: Path, tmp_path: Path) -> QualityRequest:
    """FedAvg and FedAdam on the tiny model with a validation split, the sweep to sweep.json."""
    budget = dataclasses.replace(SMALL, examples_per_site=6, validation_share=0.34)
    return _request(
        tiny_model_dir, tmp_path, budget, algorithms=("fedavg", "fedadam"),
        results_path=tmp_path / "sweep.json",
    )  # fmt: skip


def test_sweep_chooses_fedadams_server_rate_at_fedavgs_rate(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    request = _fedadam_sweep_request(tiny_model_dir, tmp_path)

    sweep = run_sweep(SweepRequest(request, (1e-4, 0.05), (), server_learning_rates=(1e-4, 0.1)))

    assert sweep["server_lr_grid"] == [1e-4, 0.1]
    # FedAdam's site rate is not swept: it trains at FedAvg's choice, its server rate swept.
    assert set(sweep["points"]) == {"fedavg"}
    chosen = sweep["chosen"]
    assert chosen["learning_rates"]["fedadam"] == chosen["learning_rates"]["fedavg"]
    servers = sweep["fedadam_server_points"]
    assert set(servers) == {"0.0001", "0.1"}
    assert servers["0.0001"] != servers["0.1"]  # the server rate reached the strategy
    best = min(servers, key=lambda k: servers[k]["validation_loss"])
    assert chosen["server_learning_rate"] == float(best)
    tuned = chosen_budget(request.budget, sweep)
    assert tuned.server_learning_rate == float(best)
    assert hyperparameters_record(sweep, tmp_path / "sweep.json")["server_lr_grid"] == [1e-4, 0.1]
    # Resuming the finished sweep trains nothing more and chooses the same.
    again = run_sweep(
        SweepRequest(
            dataclasses.replace(request, resume=True),
            (1e-4, 0.05),
            (),
            server_learning_rates=(1e-4, 0.1),
        )
    )
    assert again["chosen"] == chosen and again["fedadam_server_points"] == servers


def test_a_resumed_sweep_may_widen_its_grid_but_not_drop_points(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    request = _fedadam_sweep_request(tiny_model_dir, tmp_path)
    first = run_sweep(SweepRequest(request, (1e-4,), (), server_learning_rates=(1e-4,)))
    resumed = dataclasses.replace(request, resume=True)

    wider = run_sweep(SweepRequest(resumed, (1e-4,), (), server_learning_rates=(1e-4, 0.1)))

    assert wider["server_lr_grid"] == [1e-4, 0.1]
    servers = wider["fedadam_server_points"]
    assert servers["0.0001"] == first["fedadam_server_points"]["0.0001"]  # kept, not re-run
    assert set(servers) == {"0.0001", "0.1"}
    best = min(servers, key=lambda k: servers[k]["validation_loss"])
    assert wider["chosen"]["server_learning_rate"] == float(best)
    with pytest.raises(ResumeError, match=r"'server_lr_grid' differs .* \(a grid may only grow\)"):
        run_sweep(SweepRequest(resumed, (1e-4,), (), server_learning_rates=(0.1,)))


def test_seed_files_are_found_in_seed_order_and_named_back_to_their_family(
    tmp_path: Path,
) -> None:
    base = tmp_path / "quality-t-8-sites.json"
    for seed in (0, 10, 2):
        seed_results_path(base, seed).write_text("{}")
    (tmp_path / "quality-t-8-sites-seedx.json").write_text("{}")  # not a seed file

    files = seed_results_files(base)

    assert [p.name for p in files] == [
        "quality-t-8-sites.json",
        "quality-t-8-sites-seed2.json",
        "quality-t-8-sites-seed10.json",
    ]
    assert {seed_family_base(p) for p in files} == {base}
    assert summary_label(base) == "t-8-sites"


def test_alpha_chart_plots_every_dirichlet_file_by_its_alpha_whatever_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import quality_report

    monkeypatch.setattr(quality_report, "IMAGES", tmp_path / "img")

    def dirichlet(alpha: float, share: float) -> dict[str, Any]:
        return {
            "task_settings": {"name": "icd10", "partition": "dirichlet", "alpha": alpha},
            "goals": {"fedavg": {"gold_loss_reduction_vs_centralized": share}},
            "algorithms": {"fedavg": {"per_round": [{"gold_loss": 2.0}, {"gold_loss": 2.25}]}},
        }

    loaded = {
        "icd10-alpha1-8-sites": dirichlet(1.0, 0.9),
        "icd10-alpha0.1-8-sites": dirichlet(0.1, 0.6),
        "icd10-by-specialty": {"task_settings": {"name": "icd10", "partition": "by-chapter"}},
    }

    text = "\n".join(quality_report._alpha_chart(loaded))

    assert "rose by up to 0.250" in text
    svg = (tmp_path / "img" / "quality-ratio-vs-alpha.svg").read_text()
    assert "fedavg" in svg
    assert quality_report._alpha_chart({"icd10-by-specialty": loaded["icd10-by-specialty"]}) == []
