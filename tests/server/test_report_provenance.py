"""The report's provenance: simulation or deployment, strategy, precision, final adapter files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedsilo.config import FedsiloConfig, config_digest
from fedsilo.ledger import Entry, EntryKind
from fedsilo.report.model import UNKNOWN_EXECUTION, Execution
from fedsilo.server.report_provenance import (
    execution_of,
    final_adapter_facts,
    precision_fact,
    strategy_fact,
)
from fedsilo.server.run_folder import RunFolder

SITES = ("north", "south")


def _entry(seq: int, kind: EntryKind, payload: dict[str, Any]) -> Entry:
    return Entry(seq, kind, "2024-01-01T00:00:00.000000Z", payload, "", "", "")


def _started(config: FedsiloConfig | None = None, **fields: Any) -> Entry:
    digest = config_digest(config) if config is not None else None
    return _entry(1, EntryKind.RUN_STARTED, {"config_digest": digest, **fields})


def _hold_site_keys(run: Path, *names: str) -> None:
    for name in names:
        (run / "sites" / name).mkdir(parents=True)
        (run / "sites" / name / f"{name}.key").write_text("private")
    (run / "coordinator").mkdir()
    (run / "coordinator" / "coordinator.key").write_text("private")


def _execution(
    run: Path, config: FedsiloConfig | None, entries: list[Entry], *, private: bool = False
) -> Execution:
    return execution_of(RunFolder(run), config, entries, SITES, private=private)


def test_in_process_simulation_says_one_process_built_everything_and_held_every_key(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    config = make_config()
    _hold_site_keys(tmp_path, *SITES)

    execution = _execution(tmp_path, config, [_started(config)])

    text = " ".join(execution.caveats)
    assert execution.kind == "simulation"
    assert 'engine = "inprocess"' in execution.summary
    assert "All 2 sites ran inside the coordinator's own process" in text
    assert "does not claim that raw records never left a site" in text
    assert "The private signing keys of all 2 sites are in the run folder" in text
    assert "whoever holds this folder can also rewrite the ledger and sign it again" in text
    assert "not that separate parties took part" in text
    assert "Differential privacy" not in text  # the run used none


def test_a_private_simulation_says_what_its_dp_bound_still_holds(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    config = make_config()

    execution = _execution(tmp_path, config, [_started(config)], private=True)

    assert any("does not rest on the sites being separate" in c for c in execution.caveats)


def test_ray_simulation_names_its_worker_processes(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    config = make_config(run={"engine": "ray"})

    execution = _execution(tmp_path, config, [_started(config)])

    assert execution.kind == "simulation"
    assert "Ray worker processes on the coordinator's machine" in execution.caveats[0]


def test_a_deployment_carries_no_caveat_unless_its_folder_holds_site_keys(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    config = make_config(deployment={})
    clean, keyed = tmp_path / "clean", tmp_path / "keyed"
    clean.mkdir()
    keyed.mkdir()
    _hold_site_keys(keyed, "north")

    deployed = _execution(clean, config, [_started(config)])
    with_key = _execution(keyed, config, [_started(config)])

    assert (deployed.kind, deployed.caveats) == ("deployment", ())
    assert "SuperLink" in deployed.summary
    assert with_key.kind == "deployment"
    assert (
        "The private signing keys of 1 of the 2 sites are in the run folder" in with_key.caveats[0]
    )
    assert "do not show that only that site could have signed" in with_key.caveats[0]


def test_a_config_the_ledger_does_not_cover_establishes_nothing(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    recorded, edited = make_config(), make_config(deployment={})

    execution = _execution(tmp_path, edited, [_started(recorded)])

    assert execution.kind == "unknown"
    assert "does not match the configuration digest" in execution.summary
    assert _execution(tmp_path, None, [_started(recorded)]) == UNKNOWN_EXECUTION


def test_strategy_shows_the_server_momentum_the_run_start_entry_records() -> None:
    def strategy(**start: Any) -> str:
        return strategy_fact([_started(**start)], None).value

    assert strategy(strategy="fedavg", server_momentum=0.7) == "fedavg, server momentum 0.7"
    assert strategy(strategy="fedavg", server_momentum=0.0) == "fedavg, no server momentum"
    assert strategy(strategy="fedavg") == "fedavg, server momentum not recorded"
    assert strategy() == "not recorded"


def test_fedprox_shows_the_proximal_mu_sent_with_the_tasks() -> None:
    entries = [
        _started(strategy="fedprox", server_momentum=0.0),
        _entry(2, EntryKind.TASK_SENT, {"round": 1, "task": {"proximal_mu": 0.05}}),
    ]

    fact = strategy_fact(entries, None)

    assert fact.value == "fedprox, no server momentum, proximal mu 0.05"
    assert fact.note is not None and "the tasks sent to the sites" in fact.note


def test_fedadam_settings_come_only_from_a_config_the_ledger_covers(
    make_config: Callable[..., FedsiloConfig],
) -> None:
    config = make_config(strategy={"name": "fedadam", "server_learning_rate": 0.02})
    covered = strategy_fact([_started(config, strategy="fedadam", server_momentum=0.0)], config)
    uncovered = strategy_fact([_started(strategy="fedadam", server_momentum=0.0)], config)

    assert covered.value == (
        "fedadam, server learning rate 0.02, beta_1 0.9, beta_2 0.99, tau 0.001"
    )
    assert uncovered.value == "fedadam, server settings not recorded"


def test_strategy_note_names_a_wrapped_aggregation() -> None:
    entries = [
        _started(strategy="fedavg", server_momentum=0.0),
        _entry(2, EntryKind.ROUND_AGGREGATED, {"round": 1, "strategy": "fedavg+site-dp"}),
    ]

    note = strategy_fact(entries, None).note

    assert note is not None and "fedavg+site-dp" in note


def _update(seq: int, metrics: dict[str, Any] | None) -> Entry:
    return _entry(seq, EntryKind.UPDATE_RECEIVED, {"round": 1, "site_metrics": metrics})


def test_bf16_is_said_to_be_the_frozen_base_weights_with_fp32_adapters_and_updates() -> None:
    entries = [_started(), _update(2, {"precision": "bf16"}), _update(3, {"precision": "bf16"})]

    fact = precision_fact({"precision": "bf16"}, entries, simulated=True)

    assert fact.value == "bf16"
    assert fact.note is not None
    assert "the precision of the frozen base weights" in fact.note
    assert "at every simulated site and the coordinator's gold evaluation" in fact.note
    assert "the LoRA adapters, their gradients, the optimizer state and every update" in fact.note
    assert "are fp32" in fact.note
    assert "the sites reported bf16 with all 2 accepted updates" in fact.note


def test_outside_a_simulation_without_site_reports_no_training_precision_is_claimed() -> None:
    note = precision_fact({"precision": "bf16"}, [_started()], simulated=False).note

    assert note is not None
    assert "during local training" not in note
    assert "held in bf16 during the coordinator's gold evaluation" in note
    assert "no accepted update records a site's precision" in note


def test_precision_says_which_updates_carried_none() -> None:
    entries = [_started(), _update(2, {"precision": "fp32"}), _update(3, None)]

    note = precision_fact({"precision": "fp32"}, entries, simulated=False).note

    assert note is not None
    assert "each deployed site chooses its own" in note
    assert "fp32 with 1; none (no site metrics are sent under secure aggregation) with 1" in note


def test_final_facts_name_the_files_and_label_the_checkpoint_hash() -> None:
    finished = _entry(
        9,
        EntryKind.RUN_FINISHED,
        {
            "rounds": 28,
            "final_adapter_sha256": "5c" * 32,
            "final_files": {
                "adapter_model.safetensors": "88" * 32,
                "adapter_config.json": "54" * 32,
            },
        },
    )

    facts = {fact.label: fact for fact in final_adapter_facts(finished)}

    weights = facts["final/adapter_model.safetensors sha256"]
    assert weights.value == "88" * 32
    assert weights.note is not None and "run_finished entry 9" in weights.note
    assert facts["final/adapter_config.json sha256"].value == "54" * 32
    checkpoint = facts["Checkpoint adapter sha256 (round 28)"]
    assert checkpoint.value == "5c" * 32
    assert checkpoint.note is not None
    assert "checkpoints/round-28/adapter.safetensors" in checkpoint.note
    assert "not the hash of any file in final/" in checkpoint.note


def test_final_facts_of_an_older_ledger_and_an_unfinished_run() -> None:
    older = _entry(9, EntryKind.RUN_FINISHED, {"rounds": 2, "final_adapter_sha256": "5c" * 32})

    facts = final_adapter_facts(older)

    assert facts[0].value == "not recorded in the ledger"
    assert final_adapter_facts(None)[0].value == "none: the run did not finish"


def test_final_facts_of_a_clustered_run_name_each_expert_file() -> None:
    finished = _entry(
        5, EntryKind.RUN_FINISHED, {"clusters": 2, "experts": {"a": "aa" * 32, "b": "bb" * 32}}
    )

    facts = {fact.label: fact.value for fact in final_adapter_facts(finished)}

    assert facts == {
        "experts/a/adapter_model.safetensors sha256": "aa" * 32,
        "experts/b/adapter_model.safetensors sha256": "bb" * 32,
    }
