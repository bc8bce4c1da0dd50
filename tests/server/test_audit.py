"""Offline audit of a run folder: the ledger, its signatures and the checkpoints on disk."""

import dataclasses
import json
import os
import shutil
import sqlite3
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedsilo.cli.main import main
from fedsilo.config import FedsiloConfig
from fedsilo.crypto import (
    PrivateKey,
    UpdateBinding,
    claims_sha256,
    encode_signature,
    fingerprint,
    generate_private_key,
    public_key_text,
    read_private_key,
    sign_claims,
    sign_policy_declaration,
    sign_update,
    write_public_key,
)
from fedsilo.ledger import UPDATE_BINDING_FIELDS, EntryKind, Ledger, read_entries
from fedsilo.server import federation
from fedsilo.server.audit import read_site_keys, verify_run
from fedsilo.server.federation import FederationError
from fedsilo.server.membership import MembershipError
from fedsilo.server.run_folder import Checkpoint, RunFolder, check_server_state

from ..simulation.conftest import run_with_grid


@pytest.fixture
def finished_run(make_config: Callable[..., FedsiloConfig], tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    run_with_grid(make_config(run={"rounds": 2}), run_dir)
    return run_dir


def test_completed_run_verifies(finished_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "verify", str(finished_run)]) == 0

    assert "ledger verified" in capsys.readouterr().out
    kinds = [entry.kind for entry in read_entries(finished_run / "ledger.db")]
    assert kinds[0] is EntryKind.RUN_STARTED
    assert kinds.count(EntryKind.UPDATE_RECEIVED) == 6
    assert kinds.count(EntryKind.ROUND_AGGREGATED) == 2
    assert kinds[-1] is EntryKind.RUN_FINISHED


def test_swapped_checkpoint_is_detected(finished_run: Path) -> None:
    folder = RunFolder(finished_run)
    round_one = folder.checkpoint_dir(1) / "adapter.safetensors"
    round_one.write_bytes((folder.checkpoint_dir(2) / "adapter.safetensors").read_bytes())

    report = verify_run(finished_run)

    assert not report.ok
    assert any("round 1: the ledger records adapter" in p.reason for p in report.problems)


def test_edited_ledger_entry_fails_the_command(
    finished_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with sqlite3.connect(finished_run / "ledger.db") as db:
        db.execute(
            "UPDATE entries SET payload = replace(payload, '\"num_examples\":8', "
            "'\"num_examples\":800') WHERE kind = 'update_received' AND seq = "
            "(SELECT min(seq) FROM entries WHERE kind = 'update_received')"
        )

    assert main(["audit", "verify", str(finished_run)]) == 1

    assert "FAILED" in capsys.readouterr().out


def test_untrusted_coordinator_key_fails(finished_run: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.pub"
    write_public_key(generate_private_key().public_key(), other)

    assert main(["audit", "verify", str(finished_run), "--coordinator-key", str(other)]) == 1


def test_crash_between_ledger_and_checkpoint_resumes_to_a_verifying_ledger(
    make_config: Callable[..., FedsiloConfig],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = make_config(run={"rounds": 2})
    run_dir = tmp_path / "run"
    original = RunFolder.save_checkpoint

    def crash_on_round_two(self: RunFolder, checkpoint: object) -> None:
        if getattr(checkpoint, "round", None) == 2:
            raise FederationError("power cut while writing the checkpoint")
        original(self, checkpoint)  # type: ignore[arg-type]

    monkeypatch.setattr(RunFolder, "save_checkpoint", crash_on_round_two)
    with pytest.raises(FederationError, match="power cut"):
        run_with_grid(config, run_dir)

    assert verify_run(run_dir).ok
    monkeypatch.setattr(RunFolder, "save_checkpoint", original)
    run_with_grid(config, run_dir, resume=True)

    report = verify_run(run_dir)
    assert report.ok, report.problems
    kinds = [entry.kind for entry in read_entries(run_dir / "ledger.db")]
    assert EntryKind.RUN_RESUMED in kinds
    assert kinds.count(EntryKind.ROUND_AGGREGATED) == 3  # round 2 twice: before and after


def test_report_renders_sites_and_verdict(finished_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.html"

    assert main(["audit", "report", str(finished_run), "--out", str(out)]) == 0

    html = out.read_text()
    folder = RunFolder(finished_run)
    for site in folder.read_metrics()[1]["sites"]:
        assert site in html
    assert 'class="banner pass"' in html and "verified" in html
    assert "http://" not in html and "https://" not in html


def test_keys_init_creates_a_private_key_only_the_owner_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "init", "--site", "st-mary", "--out", str(tmp_path)]) == 0

    mode = stat.S_IMODE((tmp_path / "st-mary.key").stat().st_mode)
    assert mode == 0o600
    assert (tmp_path / "st-mary.pub").read_text().startswith("ed25519:")
    assert "fingerprint: SHA256:" in capsys.readouterr().out
    assert main(["keys", "init", "--site", "st-mary", "--out", str(tmp_path)]) == 2


def test_ledger_cut_short_is_detected(finished_run: Path) -> None:
    with sqlite3.connect(finished_run / "ledger.db") as db:
        (last,) = db.execute("SELECT max(seq) FROM entries").fetchone()
        # Drop round 2 entirely: everything after round 2 was opened.
        (opened,) = db.execute(
            "SELECT min(seq) FROM entries WHERE kind = 'round_opened' AND "
            "payload LIKE '%\"round\":2%'"
        ).fetchone()
        db.execute("DELETE FROM entries WHERE seq >= ?", (opened,))
    assert opened < last

    report = verify_run(finished_run)

    reasons = " | ".join(p.reason for p in report.problems)
    assert "no run_finished entry" in reasons
    assert "which the ledger does not hold" in reasons  # the sites' round-2 receipts
    assert "is not recorded in the ledger" in reasons  # checkpoint round-2


def test_receipt_not_signed_by_the_coordinator_is_reported(finished_run: Path) -> None:
    receipt = sorted(finished_run.glob("sites/*/receipts/*/*.json"))[0]
    receipt.write_text(receipt.read_text().replace('"ledger_seq": ', '"ledger_seq": 1'))

    report = verify_run(finished_run)

    assert any("is not valid" in p.reason for p in report.problems)


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda text: text.replace('"ledger_seq": ', '"ledger_seq": 1e400, "x": '), "ledger_seq"),
        (lambda text: "[" * 30_000 + "]" * 30_000, "nested too deeply"),
        (lambda text: "[1, 2]", "not a JSON object"),
    ],
)
def test_a_hostile_receipt_is_reported_not_raised(
    finished_run: Path, edit: Callable[[str], str], named: str
) -> None:
    # Receipts are the sites' files: whatever one holds, the audit names it and goes on.
    receipt = sorted(finished_run.glob("sites/*/receipts/*/*.json"))[0]
    receipt.write_text(edit(receipt.read_text()))

    report = verify_run(finished_run)

    assert any(f"receipt {receipt} is not valid" in p.reason and named in p.reason
               for p in report.problems)  # fmt: skip


def test_edited_server_state_fails_the_audit_and_the_resume(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    # The strategy's state (here FedAvg's server momentum) is what a resumed run applies next:
    # the ledger binds it like the adapter, so an edit needs the coordinator's key to pass.
    run_dir = tmp_path / "run"
    config = make_config(run={"rounds": 2}, strategy={"server_momentum": 0.9})
    run_with_grid(config, run_dir)
    path = RunFolder(run_dir).checkpoint_dir(2) / "server_state.safetensors"
    state = load_file(str(path))
    save_file({name: torch.full_like(value, 1e3) for name, value in state.items()}, str(path))

    report = verify_run(run_dir)

    assert any("round 2: the ledger records server state" in p.reason for p in report.problems)
    with pytest.raises(ValueError, match="the ledger does not verify"):
        run_with_grid(
            make_config(run={"rounds": 3}, strategy={"server_momentum": 0.9}), run_dir, resume=True
        )


def _crash_before_checkpoint(monkeypatch: pytest.MonkeyPatch, round_number: int) -> None:
    original = RunFolder.save_checkpoint

    def crash(self: RunFolder, checkpoint: object) -> None:
        if getattr(checkpoint, "round", None) == round_number:
            raise FederationError("power cut while writing the checkpoint")
        original(self, checkpoint)  # type: ignore[arg-type]

    monkeypatch.setattr(RunFolder, "save_checkpoint", crash)


def test_a_server_state_planted_at_round_zero_fails_the_audit_and_the_resume(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing is aggregated before round 1, so a velocity in round 0's state would move the
    # first resumed round's adapter wherever its writer chose: the baseline entry binds it.
    run_dir = tmp_path / "run"
    config = _momentum_run_stopped_before_checkpoint(
        make_config, run_dir, monkeypatch, rounds=2, crash_round=1
    )
    folder = RunFolder(run_dir)
    adapter = load_file(str(folder.checkpoint_dir(0) / "adapter.safetensors"))
    planted = {f"velocity.{name}": torch.full_like(value, 1e3) for name, value in adapter.items()}
    save_file(planted, str(folder.checkpoint_dir(0) / "server_state.safetensors"))

    report = verify_run(run_dir)

    assert any("round 0: the ledger records server state" in p.reason for p in report.problems)
    with pytest.raises(ValueError, match="the ledger does not verify"):
        run_with_grid(config, run_dir, resume=True)


def _momentum_run_stopped_before_checkpoint(
    make_config: Callable[..., FedsiloConfig],
    run_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    rounds: int,
    crash_round: int,
) -> FedsiloConfig:
    config = make_config(run={"rounds": rounds}, strategy={"server_momentum": 0.9})
    _crash_before_checkpoint(monkeypatch, crash_round)
    with pytest.raises(FederationError, match="power cut"):
        run_with_grid(config, run_dir)
    monkeypatch.undo()
    return config


def _plant_velocity_when_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoints read back with a velocity in their strategy state, as if swapped on disk
    after the resume check hashed them."""
    original = RunFolder.load_checkpoint

    def planted(self: RunFolder, round_number: int) -> Checkpoint:
        checkpoint = original(self, round_number)
        velocity = {f"velocity.{name}": v + 1.0 for name, v in checkpoint.adapter.items()}
        return dataclasses.replace(checkpoint, server_state=velocity)

    monkeypatch.setattr(RunFolder, "load_checkpoint", planted)


@pytest.mark.parametrize("crash_round", [1, 3])
def test_a_checkpoint_that_changes_after_the_resume_check_is_refused(
    make_config: Callable[..., FedsiloConfig],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    crash_round: int,
) -> None:
    # The files are hashed when the resume is checked and read again to be applied: what is
    # applied is compared with the ledger too (at round 0, with a fresh strategy's state).
    run_dir = tmp_path / "run"
    config = _momentum_run_stopped_before_checkpoint(
        make_config, run_dir, monkeypatch, rounds=3, crash_round=crash_round
    )
    _plant_velocity_when_loaded(monkeypatch)
    with pytest.raises(FederationError, match="strategy state loaded for resuming is not"):
        run_with_grid(config, run_dir, resume=True)


def test_a_resume_from_round_zero_of_an_older_ledger_refuses_any_state_but_a_fresh_one(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ledgers written before baseline_evaluated recorded the state's digest bind nothing at
    # round 0: the resume still refuses a state a fresh strategy would not have.
    run_dir = tmp_path / "run"
    config = _momentum_run_stopped_before_checkpoint(
        make_config, run_dir, monkeypatch, rounds=2, crash_round=1
    )
    original_entries = federation.read_entries

    def older_ledger(path: Path) -> list[Any]:
        return [
            dataclasses.replace(
                entry,
                payload={k: v for k, v in entry.payload.items() if k != "server_state_sha256"},
            )
            if entry.kind is EntryKind.BASELINE_EVALUATED
            else entry
            for entry in original_entries(path)
        ]

    monkeypatch.setattr(federation, "read_entries", older_ledger)
    _plant_velocity_when_loaded(monkeypatch)
    with pytest.raises(FederationError, match="from round 0 is not a fresh strategy's"):
        run_with_grid(config, run_dir, resume=True)


def test_an_update_is_ledgered_before_it_is_folded_into_the_sum(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folded_when_ledgered: list[int] = []
    original = federation.accept

    def recording_accept(plan: Any, result: Any, **fields: Any) -> Any:
        folded_when_ledgered.append(result.updates.count - len(result.ledgered))
        return original(plan, result, **fields)

    monkeypatch.setattr(federation, "accept", recording_accept)
    run_with_grid(make_config(run={"rounds": 1}), tmp_path / "run")

    assert folded_when_ledgered and set(folded_when_ledgered) == {0}


def test_a_server_state_must_fit_the_adapter() -> None:
    like = {"a.lora_A": torch.zeros(2, 3)}
    check_server_state({"velocity.a.lora_A": torch.ones(2, 3)}, like=like, what="state")
    for bad, reason in (
        ({"velocity.b.lora_A": torch.ones(2, 3)}, "names no tensor"),
        ({"m.a.lora_A": torch.ones(3, 2)}, "expected torch.float32"),
        ({"v.a.lora_A": torch.full((2, 3), float("nan"))}, "NaN"),
    ):
        with pytest.raises(ValueError, match=reason):
            check_server_state(bad, like=like, what="state")


def _site_public_keys(run: Path, into: Path) -> Path:
    """The sites' public keys as an auditor would hold them: copies, one NAME.pub per site."""
    into.mkdir()
    for public in run.glob("sites/*/*.pub"):
        shutil.copy(public, into / public.name)
    return into


def _membership(run: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((run / "federation.json").read_text())
    return data


def test_a_site_key_swapped_in_federation_json_fails(finished_run: Path) -> None:
    membership = _membership(finished_run)
    site = sorted(membership["sites"])[0]
    membership["sites"][site] = public_key_text(generate_private_key().public_key())
    (finished_run / "federation.json").write_text(json.dumps(membership))

    report = verify_run(finished_run)

    reasons = " | ".join(p.reason for p in report.problems)
    assert f"site {site!r}: federation.json pins the key SHA256:" in reasons
    assert "but the run_started entry records SHA256:" in reasons


def test_a_status_json_that_is_not_a_json_object_file_is_reported(finished_run: Path) -> None:
    # A list where an object belongs, and a FIFO that would block a plain read, are named.
    path = finished_run / "status.json"
    path.write_text("[1, 2]")
    assert any(
        str(path) in p.reason and "expected a JSON object" in p.reason
        for p in verify_run(finished_run).problems
    )
    path.unlink()
    os.mkfifo(path)
    assert any(
        str(path) in p.reason and "not a regular file" in p.reason
        for p in verify_run(finished_run).problems
    )


def test_a_federation_json_that_is_not_a_json_object_file_is_refused_naming_it(
    finished_run: Path,
) -> None:
    # The audit needs the membership to verify anything: it stops with the file's name.
    path = finished_run / "federation.json"
    path.write_text("[1, 2]")
    with pytest.raises(MembershipError, match=f"{path}: expected a JSON object"):
        verify_run(finished_run)
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(MembershipError, match=f"{path}: not a regular file"):
        verify_run(finished_run)


def test_a_federation_json_field_of_the_wrong_type_is_refused_naming_it(
    finished_run: Path,
) -> None:
    path = finished_run / "federation.json"
    membership = json.loads(path.read_text())
    path.write_text(json.dumps({**membership, "coordinator_key_path": None}))

    with pytest.raises(MembershipError, match=r"fields \['coordinator_key_path'\] must be text"):
        verify_run(finished_run)


def test_run_and_federation_ids_of_federation_json_must_be_the_ledgers(
    finished_run: Path,
) -> None:
    membership = _membership(finished_run)
    recorded = membership["run_id"]
    membership.update(run_id="another-run", federation_id="another-federation")
    (finished_run / "federation.json").write_text(json.dumps(membership))

    reasons = " | ".join(p.reason for p in verify_run(finished_run).problems)

    assert (
        "federation.json names run_id 'another-run', but the run_started entry records "
        f"{recorded!r}" in reasons
    )
    assert "federation.json names federation_id 'another-federation'" in reasons


def test_site_keys_pinned_by_the_auditor_verify_a_genuine_run(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = _site_public_keys(finished_run, tmp_path / "site-keys")

    assert main(["audit", "verify", str(finished_run), "--site-keys", str(keys)]) == 0

    assert "trusting the site keys pinned in the run folder" not in capsys.readouterr().out


def test_a_site_without_a_pinned_key_fails(finished_run: Path, tmp_path: Path) -> None:
    keys = _site_public_keys(finished_run, tmp_path / "site-keys")
    missing = sorted(keys.glob("*.pub"))[0]
    missing.unlink()

    report = verify_run(finished_run, site_keys=read_site_keys(keys))

    reasons = " | ".join(p.reason for p in report.problems)
    assert f"site {missing.stem!r} is enrolled in federation.json, but no key of yours" in reasons


def _resign_update(payload: dict[str, Any], key: PrivateKey) -> None:
    binding = UpdateBinding(**{name: payload[name] for name in UPDATE_BINDING_FIELDS})
    payload["site_signature"] = encode_signature(sign_update(key, binding))
    digest = claims_sha256(metrics=payload["site_metrics"], dp_event=payload["dp_event"])
    payload["site_claims"] = {
        "claims_sha256": digest,
        "signature": encode_signature(sign_claims(key, binding, digest)),
    }
    declared = {name: payload["site_policy"][name] for name in ("policy_sha256", "min_cohort")}
    payload["site_policy"]["signature"] = encode_signature(
        sign_policy_declaration(key, binding, declared)
    )


def test_a_coordinator_that_swaps_a_site_key_everywhere_is_caught_by_pinned_site_keys(
    finished_run: Path, tmp_path: Path
) -> None:
    keys = _site_public_keys(finished_run, tmp_path / "site-keys")
    coordinator = read_private_key(
        finished_run / "coordinator" / "coordinator.key", passphrase=None
    )
    membership = _membership(finished_run)
    site = sorted(membership["sites"])[0]
    forger = generate_private_key()
    # The coordinator pins its own key for the site, in federation.json and run_started, and
    # signs that site's updates (with edited metrics) and the whole chain anew.
    membership["sites"][site] = public_key_text(forger.public_key())
    (finished_run / "federation.json").write_text(json.dumps(membership))
    entries = read_entries(finished_run / "ledger.db")
    (finished_run / "ledger.db").unlink()
    times = iter([entry.created_at for entry in entries])
    with Ledger.open(
        finished_run / "ledger.db", coordinator_key=coordinator, clock=lambda: next(times)
    ) as ledger:
        for entry in entries:
            payload = json.loads(json.dumps(entry.payload))
            if entry.kind is EntryKind.RUN_STARTED:
                payload["sites"][site] = fingerprint(forger.public_key())
            if entry.kind is EntryKind.UPDATE_RECEIVED and payload["site_id"] == site:
                payload["site_metrics"]["num_examples"] *= 10
                payload["num_examples"] = payload["site_metrics"]["num_examples"]
                _resign_update(payload, forger)
            ledger.append(entry.kind, payload)
    for receipts in finished_run.glob("sites/*/receipts"):
        shutil.rmtree(receipts)  # a deployment's receipts stay at the sites
    pinned = coordinator.public_key()

    # The folder's own keys cannot tell (see docs/audit.md, Limits) ...
    assert verify_run(finished_run, coordinator_key=pinned).ok
    # ... the sites' keys, obtained from the sites, can.
    report = verify_run(finished_run, coordinator_key=pinned, site_keys=read_site_keys(keys))
    reasons = " | ".join(p.reason for p in report.problems)
    assert (
        f"site {site!r}: federation.json pins the key {fingerprint(forger.public_key())}" in reasons
    )
    assert f"site {site!r} signature on the update is invalid" in reasons


def test_verify_says_how_many_receipts_it_examined(
    finished_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    held = sorted(finished_run.glob("sites/*/receipts/*/*.json"))
    assert held
    assert verify_run(finished_run).receipts == len(held)
    for receipts in finished_run.glob("sites/*/receipts"):
        shutil.rmtree(receipts)

    report = verify_run(finished_run)

    assert report.ok and report.receipts == 0
    assert main(["audit", "verify", str(finished_run)]) == 0
    assert "0 receipts examined (none in the run folder)" in capsys.readouterr().out
