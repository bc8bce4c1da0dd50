"""A site refuses a round its own policy forbids; the round goes on without it."""

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message

from fedsilo.cli.main import main
from fedsilo.client.policy import PolicyError, declare_policy, load_policy, policy_digest
from fedsilo.config import FedsiloConfig
from fedsilo.data.tasks import build_task
from fedsilo.ledger import EntryKind, read_entries
from fedsilo.protocol.records import POLICY_KEY, PolicyDeclaration
from fedsilo.server.run_folder import RunFolder
from fedsilo.simulation.sites import SimulatedSites, policy_path

from .conftest import run_with_grid
from .test_hostile_updates import misbehaving


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


def test_site_without_its_policy_file_refuses_and_names_the_file(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    config = make_config(
        run={"rounds": 1, "site_policies": str(policies), "require_site_policies": True}
    )
    sites = [site.name for site in build_task(config.task, seed=config.run.seed).sites]
    for name in sites[1:]:
        (policies / f"{name}.toml").write_text('[accept]\nfederation_id = "fedsilo-simulation"\n')
    # Misnamed: the site's file is not where the site looks for it.
    (policies / f"{sites[0]}.policy.toml").write_text('[accept]\nfederation_id = "x"\n')

    with pytest.raises(PolicyError, match=re.escape(str(policies / f"{sites[0]}.toml"))):
        run_with_grid(config, tmp_path / "run")

    assert not (tmp_path / "run" / "sites").exists()  # refused before any key was made
    assert policy_path(config, sites[1]) == policies / f"{sites[1]}.toml"


def test_run_without_policies_must_say_so(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text(f'[model]\nbase = "{tiny_model_dir}"\n[task]\nnum_sites = 2\n')

    assert main(["simulate", str(config), "--out", str(tmp_path / "run")]) == 2

    assert not (tmp_path / "run" / "ledger.db").exists()


def test_policy_error_explains_the_simulation_flag(
    make_config: Callable[..., FedsiloConfig],
) -> None:
    config = make_config(run={"require_site_policies": True})

    with pytest.raises(PolicyError, match=r"run\.require_site_policies = false"):
        policy_path(config, "st-mary")
    assert policy_path(make_config(), "st-mary") is None  # the tests' explicit simulation flag


def test_policy_digest_covers_the_rules_not_the_files_spelling(tmp_path: Path) -> None:
    rules = '[accept]\nfederation_id = "f"\n[limits]\nmin_cohort = 2\n'
    spelled_otherwise = (
        "# the same rules, reordered, with a default written out\n"
        '[limits]\nbatch_size = [1, 256]\nmin_cohort = 2\n\n[accept]\nfederation_id = "f"\n'
    )
    deployed = rules + '[site]\nname = "st-mary"\ndata = "/srv/st-mary/records.jsonl"\n'
    stricter = rules.replace("min_cohort = 2", "min_cohort = 3")
    digests = {}
    for name, text in [
        ("rules", rules),
        ("spelled", spelled_otherwise),
        ("deployed", deployed),
        ("stricter", stricter),
    ]:
        (tmp_path / f"{name}.toml").write_text(text)
        digests[name] = policy_digest(load_policy(tmp_path / f"{name}.toml"))

    assert re.fullmatch(r"[0-9a-f]{64}", digests["rules"])
    assert digests["rules"] == digests["spelled"] == digests["deployed"]
    assert digests["stricter"] != digests["rules"]
    assert declare_policy(load_policy(tmp_path / "stricter.toml")) == PolicyDeclaration(
        digests["stricter"], 3
    )
    assert declare_policy(None) == PolicyDeclaration(policy_sha256=None, min_cohort=1)


def test_every_accepted_update_ledgers_the_policy_its_site_declared(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    config = make_config(run={"rounds": 1, "site_policies": str(policies)})
    first, second, third = [s.name for s in build_task(config.task, seed=config.run.seed).sites]
    for name, min_cohort in [(first, 2), (second, 3)]:
        (policies / f"{name}.toml").write_text(
            f'[accept]\nfederation_id = "fedsilo-simulation"\n[limits]\nmin_cohort = {min_cohort}\n'
        )

    run_with_grid(config, tmp_path / "run")

    declared = {
        e.payload["site_id"]: e.payload["site_policy"]
        for e in read_entries(tmp_path / "run" / "ledger.db")
        if e.kind is EntryKind.UPDATE_RECEIVED
    }
    assert {site: (d["policy_sha256"], d["min_cohort"]) for site, d in declared.items()} == {
        first: (policy_digest(load_policy(policies / f"{first}.toml")), 2),
        second: (policy_digest(load_policy(policies / f"{second}.toml")), 3),
        third: ("none", 1),
    }
    # Each declaration carries its site's signature, which verification checks.
    assert all(set(d) == {"policy_sha256", "min_cohort", "signature"} for d in declared.values())
    assert main(["audit", "verify", str(tmp_path / "run")]) == 0


def _drop_declaration(reply: Message) -> None:
    del reply.content.config_records[POLICY_KEY]


def _raise_declared_cohort(reply: Message) -> None:
    # What a coordinator would need to claim a stricter cohort than the site declared.
    record = reply.content.config_records[POLICY_KEY]
    reply.content.config_records[POLICY_KEY] = ConfigRecord({**record, "min_cohort": 5})


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (_drop_declaration, "declares no site policy"),
        (_raise_declared_cohort, "bad signature on the policy declaration"),
    ],
)
def test_an_update_without_its_signed_policy_declaration_is_rejected(
    tamper: Callable[[Message], None],
    reason: str,
    make_config: Callable[..., FedsiloConfig],
    tmp_path: Path,
) -> None:
    def undeclared(reply: Message, context: Context, sites: SimulatedSites) -> Message:
        tamper(reply)
        return reply

    run_with_grid(make_config(run={"rounds": 1}), tmp_path / "run", misbehaving(undeclared))

    [_, round_one] = RunFolder(tmp_path / "run").read_metrics()
    assert round_one["sites_ok"] == 2
    [failure] = round_one["failures"].values()
    assert reason in failure


def test_a_simulated_site_refuses_an_adapter_outside_its_policy(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    # The test config trains LoRA rank 4 on every projection.
    policies = tmp_path / "policies"
    policies.mkdir()
    config = make_config(
        run={"rounds": 1, "site_policies": str(policies)}, strategy={"min_sites": 1}
    )
    narrow, small, _ = [s.name for s in build_task(config.task, seed=config.run.seed).sites]
    accept = '[accept]\nfederation_id = "fedsilo-simulation"\n[limits]\n'
    (policies / f"{narrow}.toml").write_text(accept + 'lora_targets = ["q_proj", "v_proj"]\n')
    (policies / f"{small}.toml").write_text(accept + "lora_rank = [1, 2]\n")

    run_with_grid(config, tmp_path / "run")

    [_, round_one] = RunFolder(tmp_path / "run").read_metrics()
    assert round_one["sites_ok"] == 1
    assert narrow not in round_one["sites"] and small not in round_one["sites"]
    reasons = sorted(round_one["failures"].values())
    assert any("lora_rank=4 is outside the policy's range [1, 2]" in r for r in reasons), reasons
    assert any("are not in the policy's lora_targets ['q_proj', 'v_proj']" in r for r in reasons)
