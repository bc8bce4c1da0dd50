"""End to end on the tiny model with secure aggregation: the real ServerApp and ClientApp."""

from collections.abc import Callable
from pathlib import Path

import torch

from fedsilo.cli.main import main
from fedsilo.config import FedsiloConfig, load_config
from fedsilo.ledger import EntryKind, read_entries
from fedsilo.server.audit import verify_run
from fedsilo.server.run_folder import RunFolder

from .conftest import run_with_grid


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    return RunFolder(run_dir).load_checkpoint(1).adapter


def _plain_and_secure(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path, **secure: object
) -> tuple[RunFolder, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One round of plain FedAvg and one with the ``secure`` settings: the secure run's folder,
    then the plain and the secure final adapters."""
    run_with_grid(make_config(run={"rounds": 1}), tmp_path / "plain")
    run_with_grid(make_config(run={"rounds": 1}, **secure), tmp_path / "secure")
    return RunFolder(tmp_path / "secure"), _final(tmp_path / "plain"), _final(tmp_path / "secure")


def test_secagg_round_matches_plain_fedavg_within_quantization_error(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    # Equal example counts: FedAvg's weighted mean is the equal-weight mean secagg computes.
    folder, expected, got = _plain_and_secure(
        make_config, tmp_path, secure_aggregation={"mode": "secagg"}
    )

    [_, record] = folder.read_metrics()
    assert record["secure_aggregation"] == "secagg"
    assert record["sites_ok"] == 3 and len(record["sites"]) == 3
    assert load_config(folder.config_path).secure_aggregation.mode == "secagg"
    for name in expected:
        # 3 sites, clip 1: the decoded mean is within 3 / (2 * scale) / 3 (about 7e-10) plus
        # fp32 rounding of the result.
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6)
    assert any(not torch.equal(got[n], folder.load_checkpoint(0).adapter[n]) for n in got)
    entries = read_entries(folder.ledger_path)
    stages = [e.payload for e in entries if e.kind is EntryKind.SECURE_AGGREGATION_STAGE]
    assert [(s["stage"], s["outcome"]) for s in stages] == [
        ("advertise_keys", "completed"),
        ("share_keys", "completed"),
        ("collect_masked_inputs", "completed"),
        ("check_consistency", "completed"),
        ("unmask", "completed"),
    ]
    updates = [e.payload for e in entries if e.kind is EntryKind.UPDATE_RECEIVED]
    assert {u["stage"] for u in updates} == {"secagg-masked"}
    assert entries[0].payload["secure_aggregation"] == "secagg"
    assert "no key holder" in str(entries[0].payload["secure_aggregation_trust"])
    assert all("num_examples" not in u for u in updates)
    # Chain, coordinator and site signatures, checkpoints and every site's receipt.
    assert verify_run(folder.root).problems == ()
    assert len(list((folder.root / "sites").glob("*/receipts/*/round-1-secagg-masked.json"))) == 3


def test_secagg_with_distributed_dp_is_accounted_and_noised(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    privacy = {"site_level": True, "site_clip_norm": 0.5, "site_noise_multiplier": 1.0}
    folder, expected, got = _plain_and_secure(
        make_config, tmp_path, secure_aggregation={"mode": "secagg"}, privacy=privacy
    )

    [_, record] = folder.read_metrics()
    assert record["site_level_epsilon"] > 0
    # The auditor's recomputation from the ledger agrees (exit 1 on any difference).
    assert main(["privacy", str(folder.root)]) == 0
    assert record["secure_aggregation"] == "secagg"
    # Noise of std 1.0 * 0.5 on the sum of 3, i.e. about 0.17 on the mean, per coordinate.
    difference = torch.cat([(got[n] - expected[n]).reshape(-1) for n in got])
    assert 0.08 < float(difference.std()) < 0.35


def test_he_round_matches_plain_fedavg_within_ckks_error(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    folder, expected, got = _plain_and_secure(
        make_config, tmp_path, secure_aggregation={"mode": "he"}
    )

    [_, record] = folder.read_metrics()
    assert record["secure_aggregation"] == "he"
    assert record["sites_ok"] == 3
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6)
    entries = read_entries(folder.ledger_path)
    updates = [e.payload for e in entries if e.kind is EntryKind.UPDATE_RECEIVED]
    assert {u["stage"] for u in updates} == {"he-encrypted"}
    # The shared key is stated in the signed ledger, where a report reads it.
    started = entries[0].payload
    assert started["secure_aggregation"] == "he"
    trust = str(started["secure_aggregation_trust"])
    assert "ONE secret key shared by every site" in trust and "any single site" in trust
    assert started["he_tensors"] == []  # every tensor encrypted, recorded beside the trust line
    # Chain, coordinator and site signatures, checkpoints and every site's receipt.
    assert verify_run(folder.root).problems == ()


def test_record_level_dp_events_travel_with_the_masked_inputs(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    config = make_config(
        run={"rounds": 1},
        privacy={"record_level": True, "noise_multiplier": 1.0},
        secure_aggregation={"mode": "secagg"},
    )

    run_with_grid(config, tmp_path / "run")

    folder = RunFolder(tmp_path / "run")
    [_, record] = folder.read_metrics()
    assert record["sites_ok"] == 3 and len(record["epsilon"]) == 3
    updates = [
        e.payload for e in read_entries(folder.ledger_path) if e.kind is EntryKind.UPDATE_RECEIVED
    ]
    assert all(isinstance(u["dp_event"], dict) for u in updates)
    assert main(["privacy", str(folder.root)]) == 0
