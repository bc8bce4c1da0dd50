"""A site refuses a round its own policy forbids; the round goes on without it."""

from collections.abc import Callable
from pathlib import Path

from fedsilo.config import FedsiloConfig
from fedsilo.data.tasks import build_task
from fedsilo.ledger import EntryKind, read_entries
from fedsilo.server.run_folder import RunFolder

from .conftest import run_with_grid


def test_site_refuses_a_cohort_smaller_than_its_policy_allows(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    config = make_config(run={"rounds": 1, "site_policies": str(policies)})
    strict = build_task(config.task, seed=config.run.seed).sites[0].name
    (policies / f"{strict}.toml").write_text(
        '[accept]\nfederation_id = "fedsilo-simulation"\n[limits]\nmin_cohort = 5\n'
    )

    run_with_grid(config, tmp_path / "run")

    [_, round_one] = RunFolder(tmp_path / "run").read_metrics()
    assert round_one["sites_ok"] == 2
    assert strict not in round_one["sites"]
    [reason] = round_one["failures"].values()
    assert "TaskRefusedError" in reason
    assert "policy requires at least 5" in reason
    rejected = [
        e
        for e in read_entries(tmp_path / "run" / "ledger.db")
        if e.kind is EntryKind.UPDATE_REJECTED
    ]
    assert len(rejected) == 1
