"""Record-level DP-SGD in a federation: events ledgered, epsilon per site, budgets enforced."""

import sqlite3
from collections.abc import Callable
from pathlib import Path

import dp_accounting
import pytest

from fedsilo.cli.main import main
from fedsilo.config import FedsiloConfig
from fedsilo.data.tasks import build_task
from fedsilo.ledger import EntryKind, read_entries
from fedsilo.server.run_folder import RunFolder

from .conftest import run_with_grid, stop_run_in_last_round


def _dp_config(make_config: Callable[..., FedsiloConfig], **privacy: object) -> FedsiloConfig:
    return make_config(
        run={"rounds": 2},
        privacy={"record_level": True, "max_grad_norm": 1.0, "delta": 1e-5, **privacy},
    )


def test_private_run_reports_epsilon_that_dp_accounting_confirms(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    config = _dp_config(make_config, noise_multiplier=1.5)

    run_with_grid(config, tmp_path / "run")

    metrics = RunFolder(tmp_path / "run").read_metrics()
    final = metrics[-1]
    assert final["delta"] == 1e-5
    assert set(final["epsilon"]) == set(final["sites"])
    # Each site: 8 examples, batch 2 -> q = 0.25, 2 steps per round, 2 rounds.
    accountant = dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(0.25, dp_accounting.GaussianDpEvent(1.5))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, 4))
    expected = accountant.get_epsilon(1e-5)
    assert all(abs(eps - expected) < 1e-9 * expected for eps in final["epsilon"].values())
    assert final["train_loss"] is None  # sites release nothing but the private update
    # Withheld, so unknown: never a 0 that reads as a round without training.
    fields = ("tokens", "train_seconds", "train_tokens_per_s", "padding_share")
    assert {field: final[field] for field in fields} == dict.fromkeys(fields)
    entries = read_entries(tmp_path / "run" / "ledger.db")
    received = [e for e in entries if e.kind is EntryKind.UPDATE_RECEIVED]
    assert all(isinstance(e.payload["dp_event"], dict) for e in received)
    assert all(e.payload["num_examples"] == 1 for e in received)


def test_privacy_command_recomputes_what_was_reported(
    make_config: Callable[..., FedsiloConfig],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run_with_grid(_dp_config(make_config, noise_multiplier=1.0), tmp_path / "run")

    assert main(["privacy", str(tmp_path / "run")]) == 0

    output = capsys.readouterr().out
    assert output.count(" yes") == 3
    assert "ledger verified" in output


def test_privacy_command_checks_a_running_run_against_its_last_reported_round(
    make_config: Callable[..., FedsiloConfig],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # As a run looks while round 2 is under way: round 2's updates are ledgered, its aggregate
    # (and what follows it: checkpoint, metrics line, final adapter) is not there yet.
    run_with_grid(_dp_config(make_config, noise_multiplier=1.0), tmp_path / "run")
    folder = RunFolder(tmp_path / "run")
    stop_run_in_last_round(folder, 2, aggregated=False)
    received = [e for e in read_entries(folder.ledger_path) if e.kind is EntryKind.UPDATE_RECEIVED]
    round_one = [e for e in received if e.payload["round"] == 1]

    assert main(["privacy", str(tmp_path / "run")]) == 0

    output = capsys.readouterr().out
    assert "through round 1, the last reported" in output
    assert output.count(" yes") == len(round_one) == 3
    assert "(run status: running) the ledger holds more updates" in output
    assert output.count("(+1)") == 3


def test_privacy_command_refuses_a_ledger_that_does_not_verify(
    make_config: Callable[..., FedsiloConfig],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Somebody with write access to the ledger file claims more noise than the sites used, which
    # would make the recomputed epsilon smaller than what was spent.
    run_with_grid(_dp_config(make_config, noise_multiplier=1.0), tmp_path / "run")
    with sqlite3.connect(tmp_path / "run" / "ledger.db") as connection:
        changed = connection.execute(
            "UPDATE entries SET payload = replace(payload, '\"noise_multiplier\":1.0', "
            "'\"noise_multiplier\":4.0') WHERE kind = ? "
            "AND payload LIKE '%\"noise_multiplier\":1.0%'",
            (EntryKind.UPDATE_RECEIVED.value,),
        ).rowcount
    assert changed > 0

    assert main(["privacy", str(tmp_path / "run")]) == 1

    output = capsys.readouterr().out
    assert "epsilon not recomputed, the ledger does not verify" in output
    assert "epsilon per site" not in output


def test_target_epsilon_is_never_overshot(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    run_with_grid(_dp_config(make_config, target_epsilon=4.0), tmp_path / "run")

    final = RunFolder(tmp_path / "run").read_metrics()[-1]
    assert all(0 < eps <= 4.0 for eps in final["epsilon"].values())


def test_site_at_its_budget_refuses_and_the_round_goes_on(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    config = _dp_config(make_config, noise_multiplier=1.0)
    config = config.model_copy(
        update={"run": config.run.model_copy(update={"site_policies": policies})}
    )
    thrifty = build_task(config.task, seed=config.run.seed).sites[0].name
    # At delta 1e-5 (RDP) one round of this site costs epsilon 3.87 and two rounds 4.87:
    # with a budget of 4.5 it can afford round 1 and must refuse round 2.
    (policies / f"{thrifty}.toml").write_text(
        '[accept]\nfederation_id = "fedsilo-simulation"\n'
        "[privacy]\nmax_epsilon = 4.5\ndelta = 1e-5\n"
    )

    run_with_grid(config, tmp_path / "run")

    [_, round_one, round_two] = RunFolder(tmp_path / "run").read_metrics()
    assert thrifty in round_one["sites"]
    assert thrifty not in round_two["sites"]
    assert round_two["sites_ok"] == 2
    [reason] = round_two["failures"].values()
    assert "over the policy's budget of 4.5" in reason
    assert round_two["epsilon"][thrifty] <= 4.5


def test_local_work_in_epochs_is_ledgered_as_the_steps_the_site_trained(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    # 8 records per site, expected batch 3: q = 0.375, 3 batches per epoch, 1.5 epochs -> 5.
    config = make_config(
        run={"rounds": 2},
        train={"local_steps": None, "local_epochs": 1.5, "batch_size": 3},
        privacy={
            "record_level": True,
            "max_grad_norm": 1.0,
            "delta": 1e-5,
            "noise_multiplier": 1.2,
        },
    )

    run_with_grid(config, tmp_path / "run")

    received = [
        e
        for e in read_entries(tmp_path / "run" / "ledger.db")
        if e.kind is EntryKind.UPDATE_RECEIVED
    ]
    assert len(received) == 6  # 3 sites, 2 rounds: none rejected
    assert {
        (e.payload["dp_event"]["sampling_rate"], e.payload["dp_event"]["steps"]) for e in received
    } == {(0.375, 5)}
    accountant = dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(0.375, dp_accounting.GaussianDpEvent(1.2))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, 10))
    expected = accountant.get_epsilon(1e-5)
    final = RunFolder(tmp_path / "run").read_metrics()[-1]
    assert all(abs(eps - expected) < 1e-9 * expected for eps in final["epsilon"].values())


def test_ffa_lora_trains_under_record_level_dp_and_sends_only_b(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    config = make_config(
        lora={"rank": 4, "alpha": 8.0, "ffa": True},
        privacy={"record_level": True, "max_grad_norm": 1.0, "delta": 1e-5, "target_epsilon": 8.0},
    )

    run_with_grid(config, tmp_path / "run")

    folder = RunFolder(tmp_path / "run")
    final = folder.read_metrics()[-1]
    assert final["sites_ok"] == 3
    assert all(0 < eps <= 8.0 for eps in final["epsilon"].values())
    adapter = folder.load_checkpoint(2).adapter
    assert adapter and all(".lora_B." in name for name in adapter)
    # B starts at zero: a DP round that trained B has moved it.
    assert any(float(tensor.abs().sum()) > 0 for tensor in adapter.values())
