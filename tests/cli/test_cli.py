"""The `fedsilo` command on the tiny model: simulate, resume, export, generate, errors."""

import json
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest
from peft import PeftModel

from fedsilo.cli.main import main
from fedsilo.config import FedsiloConfig, config_to_toml
from fedsilo.model.base import load_base_model
from fedsilo.server.run_folder import RunFolder


def _write(config: FedsiloConfig, path: Path) -> Path:
    path.write_text(config_to_toml(config))
    return path


def test_simulate_then_export_then_generate(
    make_config: Callable[..., FedsiloConfig],
    tmp_path: Path,
    tiny_model_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config_path = _write(make_config(run={"rounds": 1}), tmp_path / "run.toml")
    run_dir = tmp_path / "run"

    assert main(["simulate", str(config_path), "--out", str(run_dir)]) == 0
    assert main(["export", str(run_dir), "--out", str(tmp_path / "adapter")]) == 0
    assert main(["generate", str(run_dir), "--prompt", "ICD-10-CM code for: x"]) == 0

    output = capsys.readouterr().out
    assert "round 1/1" in output
    assert "accuracy (code)" in output and "category (code)" in output
    assert "gold-set metric: code" in output
    assert "gold accuracy" in output and "(code, n=6)" in output
    base, _ = load_base_model(tiny_model_dir)
    PeftModel.from_pretrained(base, tmp_path / "adapter")


def test_simulate_resume_extends_a_run(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    one_round = _write(make_config(run={"rounds": 1}), tmp_path / "one.toml")
    two_rounds = _write(make_config(run={"rounds": 2}), tmp_path / "two.toml")
    assert main(["simulate", str(one_round), "--out", str(run_dir)]) == 0

    assert main(["simulate", str(two_rounds), "--resume", str(run_dir)]) == 0

    assert [m["round"] for m in RunFolder(run_dir).read_metrics()] == [0, 1, 2]


def test_bad_config_exits_2_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[lora]\nrank = 0\n")

    assert main(["simulate", str(path), "--out", str(tmp_path / "run")]) == 2

    error = capsys.readouterr().err
    assert "bad.toml" in error
    assert "lora.rank" in error


def test_export_of_missing_run_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2

    assert "no such run folder" in capsys.readouterr().err


def test_packaged_demo_config_is_the_documented_default() -> None:
    from fedsilo.cli.main import _demo_config

    config = _demo_config(rounds=None)

    assert config.model.base == "smollm2-135m-instruct"
    assert config.task.name == "icd10"
    assert config.num_sites == 4
    assert config.run.rounds == 56
    assert config.evaluation.every_rounds == 56  # gold scored before and after only
    assert _demo_config(rounds=5).run.rounds == 5


def test_bench_quality_resume_goes_on_in_the_folder_its_results_name(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a fresh --out would land under ./runs
    results = tmp_path / "quality.json"
    common = ["bench", "quality", "--task", "icd10-alpha1", "--model", str(tiny_model_dir)]
    common += ["--sites", "2", "--rounds", "1", "--local-steps", "1", "--batch-size", "2"]
    common += ["--examples-per-site", "4", "--gold-size", "4", "--lora-rank", "2"]
    common += ["--algorithms", "fedavg", "--no-edge-cases", "--results", str(results)]
    assert main([*common, "--out", str(tmp_path / "bench")]) == 0
    first = json.loads(results.read_text())
    # The results say how to run them again.
    assert first["command"] == shlex.join(["fedsilo", *common, "--out", str(tmp_path / "bench")])
    results.write_text(json.dumps({**first, "algorithms": {}, "complete": False}))

    assert main([*common, "--resume"]) == 0

    resumed = json.loads(results.read_text())
    assert resumed["out_dir"] == str(tmp_path / "bench")
    assert (
        resumed["algorithms"]["fedavg"]["per_round"] == first["algorithms"]["fedavg"]["per_round"]
    )
    assert not (tmp_path / "runs").exists()


def test_bench_quality_runs_a_later_seed_alone_on_the_first_seeds_finished_sweep(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "quality.json"
    common = ["bench", "quality", "--task", "icd10-alpha1", "--model", str(tiny_model_dir)]
    common += ["--sites", "2", "--rounds", "1", "--local-steps", "1", "--batch-size", "2"]
    common += ["--examples-per-site", "8", "--gold-size", "4", "--lora-rank", "2"]
    common += ["--algorithms", "centralized", "--no-edge-cases", "--results", str(results)]
    common += ["--out", str(tmp_path / "bench"), "--validation-share", "0.25"]
    common += ["--sweep", "--lr-grid", "0.01", "0.02"]
    assert main([*common, "--seeds", "0"]) == 0
    sweep = json.loads((tmp_path / "quality-sweep.json").read_text())

    # Seed 1 alone would sweep on seed 1: a different sweep than the finished one.
    assert main([*common, "--resume", "--seeds", "1"]) != 0
    assert main([*common, "--resume", "--sweep-seed", "0", "--seeds", "1"]) == 0

    seed1 = json.loads((tmp_path / "quality-seed1.json").read_text())
    assert seed1["budget"]["seed"] == 1
    assert seed1["hyperparameters"]["chosen"] == sweep["chosen"]
    assert json.loads((tmp_path / "quality-sweep.json").read_text())["points"] == sweep["points"]


def test_a_later_seed_run_alone_joins_its_seed_zero_files_summary_entry(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    summary = tmp_path / "summary.json"
    common = ["bench", "quality", "--task", "icd10-alpha1", "--model", str(tiny_model_dir)]
    common += ["--sites", "2", "--rounds", "1", "--local-steps", "1", "--batch-size", "2"]
    common += ["--examples-per-site", "4", "--gold-size", "4", "--lora-rank", "2"]
    common += ["--algorithms", "centralized", "--no-edge-cases", "--summary", str(summary)]
    assert main([*common, "--results", str(tmp_path / "quality-x.json"), "--seed", "0"]) == 0
    seed1 = ["--results", str(tmp_path / "quality-x-seed1.json"), "--seed", "1"]

    assert main([*common, *seed1, "--out", str(tmp_path / "seed1")]) == 0

    tasks = json.loads(summary.read_text())["tasks"]
    assert list(tasks) == ["x"]
    assert tasks["x"]["algorithms"]["centralized"]["seeds"] == [0, 1]
    # --seeds with one seed's file would write seed 0 over it: refused.
    assert main([*common, "--results", str(tmp_path / "quality-x-seed1.json"), "--seeds", "0"]) == 2


def test_the_console_shows_training_progress_in_its_bar_not_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from io import StringIO

    from rich.console import Console

    from fedsilo.cli.progress import ConsoleReporter
    from fedsilo.training.loop import StepProgress
    from fedsilo.training.progress import report_progress

    reporter = ConsoleReporter(Console(file=StringIO(), force_terminal=False), metric="code")
    step = StepProgress(1, 4, 120, 1.0, 2.5)

    with caplog.at_level("INFO", logger="fedsilo.training"):
        with reporter.training_progress():
            report_progress("st-mary", step)
        assert caplog.records == []
        report_progress("st-mary", step)

    assert [r.getMessage() for r in caplog.records] == [
        "site st-mary: training step 1/4, 120 tokens/s"
    ]
