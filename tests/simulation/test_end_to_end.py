"""End to end on the tiny model: 3 sites, 2 rounds, the real ServerApp and ClientApp."""

from collections.abc import Callable
from pathlib import Path

import torch
from peft import PeftModel

from fedsilo.config import FedsiloConfig, load_config
from fedsilo.ledger import EntryKind
from fedsilo.ledger.store import read_entries
from fedsilo.model.base import load_base_model
from fedsilo.server.run_folder import RunFolder

from .conftest import run_with_grid

REQUIRED_METRICS = {
    "round",
    "sites_ok",
    "sites_failed",
    "train_loss",
    "gold_accuracy",
    "gold_category_accuracy",
    "gold_loss",
    "seconds",
}


def test_three_sites_two_rounds(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path, tiny_model_dir: Path
) -> None:
    config = make_config()
    run_dir = tmp_path / "run"

    run_with_grid(config, run_dir)

    folder = RunFolder(run_dir)
    metrics = folder.read_metrics()
    assert [m["round"] for m in metrics] == [0, 1, 2]
    assert all(set(m) >= REQUIRED_METRICS for m in metrics)
    assert [m["sites_ok"] for m in metrics[1:]] == [3, 3]
    assert load_config(folder.config_path) == config
    assert folder.read_json(folder.run_info_path)["base_model_hash"].startswith("sha256:")
    assert folder.read_json(folder.status_path)["status"] == "completed"
    initial = folder.load_checkpoint(0).adapter
    final = folder.load_checkpoint(2).adapter
    assert any(not torch.equal(initial[n], final[n]) for n in initial)
    assert metrics[2]["gold_loss"] != metrics[0]["gold_loss"]


def test_rounds_report_training_time_speed_padding_and_precision(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    config = make_config(run={"rounds": 1})
    run_dir = tmp_path / "run"

    run_with_grid(config, run_dir)

    folder = RunFolder(run_dir)
    round_one = folder.read_metrics()[1]
    assert round_one["precision"] == "fp32"
    assert round_one["train_seconds"] > 0
    assert round_one["train_tokens_per_s"] == round_one["tokens"] / round_one["train_seconds"]
    assert 0.0 <= round_one["padding_share"] < 1.0
    assert folder.read_json(folder.run_info_path)["precision"] == "fp32"
    started = read_entries(folder.ledger_path)[0]
    assert started.kind is EntryKind.RUN_STARTED
    assert started.payload["precision"] == "fp32"


def test_final_folder_loads_as_peft_adapter(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path, tiny_model_dir: Path
) -> None:
    config = make_config(run={"rounds": 1})
    run_dir = tmp_path / "run"
    run_with_grid(config, run_dir)
    base, _ = load_base_model(tiny_model_dir)

    model = PeftModel.from_pretrained(base, RunFolder(run_dir).final_dir)

    state = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert state and any(p.abs().sum() > 0 for p in state.values())
