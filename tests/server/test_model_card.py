"""`fedsilo export` carries the run's provenance: a model card and a named base model."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from fedsilo.cli.main import main
from fedsilo.config import FedsiloConfig
from fedsilo.ledger import read_entries
from fedsilo.model.base import DEFAULT_BASE_MODEL, base_model_name
from fedsilo.server.privacy_report import site_epsilons

from ..simulation.conftest import run_with_grid


def test_the_embedded_default_is_named_by_its_hub_id() -> None:
    assert base_model_name(DEFAULT_BASE_MODEL) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_name("/home/me/models/my-llama") == "my-llama"


def test_export_writes_a_model_card_with_the_runs_provenance(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path, tiny_model_dir: Path
) -> None:
    config = make_config(
        run={"rounds": 1},
        privacy={"record_level": True, "noise_multiplier": 1.0, "delta": 1e-5},
    )
    run = tmp_path / "run"
    run_with_grid(config, run)
    out = tmp_path / "exported"

    assert main(["export", str(run), "--out", str(out)]) == 0

    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == tiny_model_dir.name
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\n")
    assert f'base_model: "{tiny_model_dir.name}"' in card
    entries = read_entries(run / "ledger.db")
    run_info = json.loads((run / "run.json").read_text())
    for value in (
        run_info["base_model_hash"],
        entries[-1].entry_hash,
        "| Task | icd10 |",
        "| Strategy | fedavg |",
        "| Secure aggregation | none |",
        "| Precision | fp32 |",
        "record-level",
        "PeftModel.from_pretrained",
    ):
        assert value in card, value
    # Both gold scores, each with what it measures, and the interval where one is recorded:
    # exact-code accuracy alone would understate an ICD-10 model judged on its category.
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert "(6 examples; metric `code`, accuracy: exact ICD-10-CM code" in card
    assert f"| accuracy | {last['gold_accuracy'] * 100:.1f}% | |" in card
    low, high = last["gold_category_accuracy_ci95"]
    assert (
        f"| category | {last['gold_category_accuracy'] * 100:.1f}% | "
        f"[{low * 100:.1f}%, {high * 100:.1f}%] |"
    ) in card
    assert last["gold_parts"]
    for part, figures in last["gold_parts"].items():
        assert f"| {part} | category accuracy | {figures['category_accuracy'] * 100:.1f}% |" in card
    for site, epsilon in site_epsilons(entries, delta=1e-5, accountant="rdp").items():
        assert f"| {site} | record-level DP-SGD | {epsilon:.4f} |" in card
    # The local path of the base model is in the card, not in the adapter's config.
    assert str(tiny_model_dir) in card
    assert str(tiny_model_dir) not in json.dumps(adapter_config)


def test_the_card_names_server_momentum_when_the_run_had_it() -> None:
    from fedsilo.server.model_card import _strategy

    assert (
        _strategy({"strategy": "fedavg", "server_momentum": 0.7}) == "fedavg, server momentum 0.7"
    )
    assert _strategy({"strategy": "fedavg", "server_momentum": 0.0}) == "fedavg"
    # Ledgers from before the field existed.
    assert _strategy({"strategy": "fedprox"}) == "fedprox"
    assert _strategy({}) == "not recorded"
