"""The audit covers what a run hands out: final/, the run's end, receipts, metrics, lineage."""

import json
import os
import shutil
import sqlite3
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from safetensors.torch import load_file, save_file

from fedsilo.cli.main import main
from fedsilo.config import FedsiloConfig
from fedsilo.crypto import (
    PrivateKey,
    Receipt,
    UpdateBinding,
    encode_signature,
    generate_private_key,
    public_key_text,
    read_private_key,
    sign_receipt,
)
from fedsilo.ledger import EntryKind, Ledger, VerifyReport, read_entries
from fedsilo.ledger.entries import sign_entry_hash
from fedsilo.server import audit
from fedsilo.server.audit import verify_run
from fedsilo.server.folder_checks import UnsafeFileError, contained, hash_file
from fedsilo.server.run_folder import RunFolder

from ..simulation.conftest import resume_and_stop_after_round, run_with_grid


@pytest.fixture
def finished_run(make_config: Callable[..., FedsiloConfig], tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    run_with_grid(make_config(run={"rounds": 2}), run_dir)
    return run_dir


def _reasons(run_dir: Path, **kwargs: object) -> str:
    report = verify_run(run_dir, **kwargs)  # type: ignore[arg-type]
    assert not report.ok
    return " | ".join(problem.reason for problem in report.problems)


def _cut_from(run_dir: Path, first_seq: int) -> None:
    with sqlite3.connect(run_dir / "ledger.db") as db:
        db.execute("DELETE FROM entries WHERE seq >= ?", (first_seq,))


def _round_two_opened(run_dir: Path) -> int:
    return next(
        entry.seq
        for entry in read_entries(run_dir / "ledger.db")
        if entry.kind is EntryKind.ROUND_OPENED and entry.payload.get("round") == 2
    )


def test_completed_run_verifies_with_final_files_recorded(finished_run: Path) -> None:
    finished = read_entries(finished_run / "ledger.db")[-1]

    assert verify_run(finished_run).ok
    assert sorted(finished.payload["final_files"]) == [  # type: ignore[arg-type]
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def test_replaced_final_adapter_fails_verify_and_export(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = finished_run / "final" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({name: tensor * 2 for name, tensor in tensors.items()}, str(weights))
    out = tmp_path / "exported"

    assert main(["audit", "verify", str(finished_run)]) == 1
    assert main(["export", str(finished_run), "--out", str(out)]) == 2

    err = capsys.readouterr().err
    assert "refusing to export" in err
    assert "adapter_model.safetensors" in err
    assert not out.exists()


def test_generate_refuses_a_run_whose_checkpoint_was_replaced(
    finished_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompt = ["generate", str(finished_run), "--prompt", "ICD-10-CM code for: x"]
    assert main(prompt) == 0
    capsys.readouterr()
    folder = RunFolder(finished_run)
    last = folder.checkpoint_dir(2)
    weights = next(p for p in last.iterdir() if p.name.endswith(".safetensors"))
    tensors = load_file(str(weights))
    save_file({name: tensor * 2 for name, tensor in tensors.items()}, str(weights))

    assert main(prompt) == 2
    err = capsys.readouterr().err
    assert "refusing to answer from an adapter the run's ledger does not vouch for" in err


def test_edited_adapter_config_fails(finished_run: Path) -> None:
    config = finished_run / "final" / "adapter_config.json"
    settings = json.loads(config.read_text())
    settings["lora_alpha"] = 1000
    config.write_text(json.dumps(settings))

    assert "adapter_config.json hashes to" in _reasons(finished_run)


def test_verified_run_exports(finished_run: Path, tmp_path: Path) -> None:
    assert main(["export", str(finished_run), "--out", str(tmp_path / "out")]) == 0

    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_last_entry_cut_with_final_folder_fails(finished_run: Path) -> None:
    last = read_entries(finished_run / "ledger.db")[-1]
    assert last.kind is EntryKind.RUN_FINISHED
    _cut_from(finished_run, last.seq)
    shutil.rmtree(finished_run / "final")

    assert "says the run completed" in _reasons(finished_run)


def test_a_completed_run_without_its_final_adapter_fails(finished_run: Path) -> None:
    shutil.rmtree(finished_run / "final")

    assert "says the run completed, but" in _reasons(finished_run)
    assert "final is missing: the final adapter run_finished records" in _reasons(finished_run)


def test_a_final_that_is_not_a_folder_is_a_problem_not_a_crash(finished_run: Path) -> None:
    shutil.rmtree(finished_run / "final")
    (finished_run / "final").write_text("not an adapter")

    assert "final is not a folder" in _reasons(finished_run)


def test_a_checkpoint_folder_named_like_another_round_is_not_taken_for_it(
    finished_run: Path,
) -> None:
    folder = RunFolder(finished_run)
    recorded = folder.checkpoint_rounds()
    for alias in ("round-01", "round-1\n", "round-\u0661"):  # the last: Arabic-Indic 1
        shutil.copytree(folder.checkpoint_dir(2), folder.checkpoints_dir / alias)

    assert folder.checkpoint_rounds() == recorded


def _cut_round_two_with_its_files(run_dir: Path) -> None:
    _cut_from(run_dir, _round_two_opened(run_dir))
    folder = RunFolder(run_dir)
    shutil.rmtree(folder.final_dir)
    shutil.rmtree(folder.checkpoint_dir(2))
    folder.write_metrics(folder.read_metrics()[:2])
    for receipt in run_dir.glob("sites/*/receipts/*/round-2-*.json"):
        receipt.unlink()


def test_last_round_cut_with_its_receipts_and_files_fails(finished_run: Path) -> None:
    _cut_round_two_with_its_files(finished_run)

    assert "says the run completed" in _reasons(finished_run)


def test_receipts_repointed_at_earlier_entries_fail_under_the_trusted_key(
    finished_run: Path,
) -> None:
    receipts = sorted(finished_run.glob("sites/*/receipts/*/round-2-*.json"))
    originals = {path: json.loads(path.read_text()) for path in receipts}
    _cut_round_two_with_its_files(finished_run)
    (finished_run / "status.json").write_text('{"status": "failed"}')
    key = read_private_key(finished_run / "coordinator" / "coordinator.key", passphrase=None)
    entries = read_entries(finished_run / "ledger.db")
    for path, data in originals.items():
        # A coordinator holding its key re-signs each round-2 receipt for the site's round-1
        # entry: seq and entry hash exist in the ledger, the signature verifies.
        binding = UpdateBinding(**data["binding"])
        target = next(
            e
            for e in entries
            if e.kind is EntryKind.UPDATE_RECEIVED and e.payload["site_id"] == binding.site_id
        )
        receipt = Receipt(binding, ledger_seq=target.seq, entry_hash=target.entry_hash)
        record = {
            "binding": data["binding"],
            "ledger_seq": target.seq,
            "entry_hash": target.entry_hash,
            "signature": encode_signature(sign_receipt(key, receipt)),
        }
        path.write_text(json.dumps(record))
    trusted = finished_run / "coordinator" / "coordinator.pub"

    assert main(["audit", "verify", str(finished_run), "--coordinator-key", str(trusted)]) == 1
    assert "acknowledges the update" in _reasons(finished_run)


@pytest.mark.parametrize("where", ["metrics.jsonl", "round.json"])
def test_edited_gold_accuracy_fails(finished_run: Path, where: str) -> None:
    folder = RunFolder(finished_run)
    if where == "metrics.jsonl":
        records = folder.read_metrics()
        records[2]["gold_accuracy"] = 0.99
        folder.write_metrics(records)
    else:
        path = folder.checkpoint_dir(1) / "round.json"
        record = json.loads(path.read_text())
        record["gold_accuracy"] = 0.99
        path.write_text(json.dumps(record))

    assert "metrics are not the ones the ledger records" in _reasons(finished_run)


def test_report_marks_metrics_the_ledger_does_not_record(finished_run: Path) -> None:
    from fedsilo.server.report_data import build_report_data

    folder = RunFolder(finished_run)
    folder.write_metrics([*folder.read_metrics(), {**folder.read_metrics()[-1], "round": 7}])
    report = verify_run(finished_run)

    data = build_report_data(finished_run, report, key_source="folder")

    unrecorded = [row.round for row in data.rounds if row.adapter_sha256 is None]
    assert unrecorded == [7]


def _append(run_dir: Path, kind: EntryKind, payload: dict[str, object]) -> int:
    key = read_private_key(run_dir / "coordinator" / "coordinator.key", passphrase=None)
    with Ledger.open(run_dir / "ledger.db", coordinator_key=key) as ledger:
        return ledger.append(kind, payload).seq  # type: ignore[arg-type]


def _resign_with_another_key(run_dir: Path, seq: int) -> None:
    other = generate_private_key()
    with sqlite3.connect(run_dir / "ledger.db") as db:
        query = "SELECT entry_hash FROM entries WHERE seq = ?"
        (entry_hash,) = db.execute(query, (seq,)).fetchone()
        signature = encode_signature(sign_entry_hash(other, seq=seq, entry_hash=entry_hash))
        db.execute("UPDATE entries SET signature = ? WHERE seq = ?", (signature, seq))


def test_lineage_reads_nothing_an_unverified_entry_names(
    finished_run: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"secret")
    seq = _append(
        finished_run,
        EntryKind.DISTILL_SOURCES,
        {"transfer": {"file": str(outside), "sha256": "0" * 64}, "experts": {}},
    )
    _resign_with_another_key(finished_run, seq)

    reasons = _reasons(finished_run)

    assert "coordinator signature does not verify" in reasons
    assert str(outside) not in reasons  # neither read nor hashed


def test_lineage_refuses_absolute_and_escaping_paths(finished_run: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"secret")
    _append(
        finished_run,
        EntryKind.DISTILL_SOURCES,
        {"transfer": {"file": str(outside), "sha256": "0" * 64}, "experts": {}},
    )
    _append(
        finished_run,
        EntryKind.DISTILL_SOURCES,
        {"transfer": {"file": "../outside.bin", "sha256": "0" * 64}, "experts": {}},
    )

    reasons = _reasons(finished_run)

    assert "is the absolute path" in reasons
    assert "leaves the run folder" in reasons
    assert "hashes to" not in reasons


def test_a_lineage_entry_that_cannot_be_read_fails_that_entry_not_the_audit(
    finished_run: Path,
) -> None:
    config = finished_run / "config.toml"
    settings = tomllib.loads(config.read_text())
    settings["clusters"]["method"] = "update-cosine"
    config.write_text(tomli_w.dumps(settings))
    # A similarity no float can hold: the entry fails, the audit goes on to report it.
    _append(
        finished_run,
        EntryKind.CLUSTERS_ASSIGNED,
        {
            "clusters": {"a": ["x"]},
            "method": "update-cosine",
            "similarity": {"x": {"x": 10**400}},
            "probe_sha256": {},
        },
    )

    reasons = _reasons(finished_run)

    assert "clusters_assigned: OverflowError: int too large to convert to float" in reasons


def test_a_link_out_of_the_run_folder_fails_the_audit(finished_run: Path) -> None:
    elsewhere = finished_run.parent / "elsewhere.jsonl"
    shutil.copy(finished_run / "metrics.jsonl", elsewhere)
    (finished_run / "metrics.jsonl").unlink()
    (finished_run / "metrics.jsonl").symlink_to(elsewhere)
    # A link that stays inside the folder is no problem.
    (finished_run / "inside-link").symlink_to(finished_run / "status.json")

    reasons = _reasons(finished_run)

    assert f"metrics.jsonl links to {elsewhere.resolve()}, outside the run folder" in reasons
    assert "inside-link" not in reasons


def test_lineage_self_reference_is_a_problem_not_a_recursion(finished_run: Path) -> None:
    _append(
        finished_run,
        EntryKind.DISTILL_SOURCES,
        {
            "experts": {},
            "source_run": {
                "folder": str(finished_run.resolve()),
                "ledger_head_hash": "0" * 64,
                "ledger_entries": 1,
            },
        },
    )

    assert "refers back to a run that names it" in _reasons(finished_run)


def _run_naming(folder: Path, sources: list[Path], key: PrivateKey) -> Path:
    """A bare run folder whose ledger names each of ``sources`` as a distillation source."""
    folder.mkdir(parents=True)
    membership = {
        "federation_id": "f",
        "run_id": folder.name,
        "coordinator_key_path": "coordinator.key",
        "coordinator_public_key": public_key_text(key.public_key()),
        "sites": {},
    }
    (folder / "federation.json").write_text(json.dumps(membership))
    with Ledger.open(folder / "ledger.db", coordinator_key=key) as ledger:
        ledger.append(EntryKind.RUN_STARTED, {"federation_id": "f", "run_id": folder.name})
        for source in sources:
            ledger.append(EntryKind.DISTILL_SOURCES, {"source_run": {"folder": str(source)}})
    return folder


def test_a_source_run_named_many_times_is_verified_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Four levels, each naming the level below three times: 3 + 9 + 27 + 81 verifications
    # of the same four runs when each name is followed anew.
    key = generate_private_key()
    level = _run_naming(tmp_path / "level-4", [], key)
    for depth in (3, 2, 1, 0):
        level = _run_naming(tmp_path / f"level-{depth}", [level] * 3, key)
    calls: list[Path] = []
    original = audit.verify_run

    def counting(run_dir: Path, **kwargs: Any) -> VerifyReport:
        calls.append(Path(run_dir))
        return original(run_dir, **kwargs)

    monkeypatch.setattr(audit, "verify_run", counting)

    report = audit.verify_run(level)

    assert sorted(path.name for path in calls) == [f"level-{n}" for n in range(5)]
    # Each name still gets its run's verdict: here, that a source run is not fully recorded.
    assert report.problems


def test_an_audit_verifies_a_bounded_number_of_nested_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit, "MAX_NESTED_RUNS", 2)
    key = generate_private_key()
    sources = [_run_naming(tmp_path / f"source-{n}", [], key) for n in range(3)]
    top = _run_naming(tmp_path / "top", sources, key)

    reasons = " | ".join(problem.reason for problem in audit.verify_run(top).problems)

    assert "source-2 would be run 3 verified in this audit; not followed" in reasons
    assert "source-0 would be" not in reasons


def test_audit_hashes_only_regular_files_inside_the_folder(tmp_path: Path) -> None:
    with pytest.raises(UnsafeFileError, match="not a regular file"):
        hash_file(Path("/dev/zero"))
    # A FIFO is refused without blocking: it is opened non-blocking and checked once open.
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(UnsafeFileError, match="not a regular file"):
        hash_file(tmp_path / "fifo")
    with pytest.raises(UnsafeFileError, match="cannot be read"):
        hash_file(tmp_path / "missing")
    (tmp_path / "big").write_bytes(b"x" * 11)
    with pytest.raises(UnsafeFileError, match="11 bytes, over the 10-byte limit"):
        hash_file(tmp_path / "big", limit=10)
    (tmp_path / "link").symlink_to("/dev/zero")
    with pytest.raises(UnsafeFileError, match="leaves the run folder"):
        contained(tmp_path, "link", field="transfer.file")


def test_resume_refuses_a_folder_without_its_ledger(
    make_config: Callable[..., FedsiloConfig], finished_run: Path
) -> None:
    (finished_run / "ledger.db").unlink()

    with pytest.raises(ValueError, match=r"ledger\.db: not found"):
        run_with_grid(make_config(run={"rounds": 3}), finished_run, resume=True)


def test_resume_refuses_a_ledger_that_does_not_verify(
    make_config: Callable[..., FedsiloConfig], finished_run: Path
) -> None:
    with sqlite3.connect(finished_run / "ledger.db") as db:
        db.execute("DELETE FROM entries WHERE seq = 3")

    with pytest.raises(ValueError, match="the ledger does not verify"):
        run_with_grid(make_config(run={"rounds": 3}), finished_run, resume=True)


def test_resume_of_a_missing_folder_writes_nothing(
    tmp_path: Path, make_config: Callable[..., FedsiloConfig]
) -> None:
    config = tmp_path / "run.toml"
    config.write_text(f'[model]\nbase = "{make_config().model.base}"\n')
    missing = tmp_path / "nowhere"

    assert main(["simulate", str(config), "--resume", str(missing)]) == 2
    assert not missing.exists()


def test_ledgers_without_final_files_still_bind_the_final_weights(finished_run: Path) -> None:
    from fedsilo.server.folder_checks import final_tensor_problems

    folder = RunFolder(finished_run)
    finished = read_entries(finished_run / "ledger.db")[-1]
    digest = finished.payload["final_adapter_sha256"]
    assert final_tensor_problems(folder, finished.seq, digest) == []
    weights = folder.final_dir / "adapter_model.safetensors"
    save_file({k: v * 2 for k, v in load_file(str(weights)).items()}, str(weights))

    [problem] = final_tensor_problems(folder, finished.seq, digest)

    assert "does not hold the final adapter" in problem.reason


def test_completed_run_resumed_for_more_rounds_and_stopped_still_verifies_and_resumes(
    make_config: Callable[..., FedsiloConfig],
    finished_run: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    resume_and_stop_after_round(make_config(run={"rounds": 4}), finished_run, 3, monkeypatch)

    report = verify_run(finished_run)
    assert report.ok, report.problems
    run_with_grid(make_config(run={"rounds": 4}), finished_run, resume=True)
    assert verify_run(finished_run).ok


@pytest.mark.parametrize("crash_at", ["before the entry", "after the entry"])
def test_a_crash_while_finishing_leaves_a_run_that_verifies_and_resumes(
    make_config: Callable[..., FedsiloConfig],
    finished_run: Path,
    monkeypatch: pytest.MonkeyPatch,
    crash_at: str,
) -> None:
    import fedsilo.server.app as server_app

    original_append = Ledger.append
    original_replace = server_app.os.replace

    def append(self: Ledger, kind: EntryKind, payload: dict[str, object]) -> object:
        if kind is EntryKind.RUN_FINISHED and crash_at == "before the entry":
            raise RuntimeError("power cut")
        return original_append(self, kind, payload)  # type: ignore[arg-type]

    def replace(source: Path, target: Path) -> None:
        if Path(target).name == "final" and crash_at == "after the entry":
            raise RuntimeError("power cut")
        original_replace(source, target)

    monkeypatch.setattr(Ledger, "append", append)
    monkeypatch.setattr(server_app.os, "replace", replace)
    with pytest.raises(RuntimeError, match="power cut"):
        run_with_grid(make_config(run={"rounds": 3}), finished_run, resume=True)
    monkeypatch.undo()

    report = verify_run(finished_run)
    assert report.ok, report.problems
    run_with_grid(make_config(run={"rounds": 3}), finished_run, resume=True)
    assert verify_run(finished_run).ok


def _forged_last_record(folder: RunFolder, round_value: object) -> None:
    """The last record, its round written as ``round_value`` and its accuracies raised."""
    records = folder.read_metrics()
    records[-1] = {**records[-1], "round": round_value, "gold_accuracy": 0.93}
    records[-1]["gold_category_accuracy"] = 0.97
    folder.write_metrics(records)


@pytest.mark.parametrize("round_value", [2.0, "2"], ids=["float", "text"])
def test_a_record_whose_round_is_not_an_integer_fails_and_is_never_shown_as_the_result(
    finished_run: Path, tmp_path: Path, round_value: object
) -> None:
    from fedsilo.server.model_card import model_card
    from fedsilo.server.report_data import build_report_data

    folder = RunFolder(finished_run)
    _forged_last_record(folder, round_value)

    report = verify_run(finished_run)

    reasons = " | ".join(problem.reason for problem in report.problems)
    assert f"metrics.jsonl line 3: field 'round' is {round_value!r}, not an integer" in reasons
    assert "holds no record of round 2, whose metrics the ledger records" in reasons
    data = build_report_data(finished_run, report, key_source="folder")
    assert [row.round for row in data.rounds] == [0, 1]
    assert all(row.gold_accuracy != 0.93 for row in data.rounds)
    card = model_card(finished_run, finished_run / "final")
    assert "93.0%" not in card and "97.0%" not in card
    assert "Not stated: metrics.jsonl holds no record of round 2" in card


def test_the_report_marks_a_record_that_differs_from_the_ledger_unverified(
    finished_run: Path,
) -> None:
    from fedsilo.server.report_data import build_report_data

    folder = RunFolder(finished_run)
    honest = build_report_data(finished_run, verify_run(finished_run), key_source="folder")
    _forged_last_record(folder, 2)

    report = verify_run(finished_run)
    data = build_report_data(finished_run, report, key_source="folder")

    assert not report.ok
    assert [row.metrics_ledgered for row in honest.rounds] == [True, True, True]
    assert [row.metrics_ledgered for row in data.rounds] == [True, True, False]
    # The gold parts come only from the ledgered record of the last round.
    assert honest.gold_parts and data.gold_parts == ()


@pytest.mark.parametrize("edit", ["deleted", "reordered", "repeated"])
def test_records_deleted_reordered_or_repeated_fail(finished_run: Path, edit: str) -> None:
    folder = RunFolder(finished_run)
    records = folder.read_metrics()
    if edit == "deleted":
        del records[1]
    elif edit == "reordered":
        records[1], records[2] = records[2], records[1]
    else:
        records.insert(2, records[1])
    folder.write_metrics(records)

    reasons = _reasons(finished_run)

    if edit == "deleted":
        assert "holds no record of round 1, whose metrics the ledger records" in reasons
    else:
        assert "the records are out of order or repeated" in reasons


def test_the_last_record_of_a_finished_run_may_not_be_missing(finished_run: Path) -> None:
    # Only a run that stopped right after ledgering its last round may lack that round's
    # record (see test_crash_between_ledger_and_checkpoint_resumes_to_a_verifying_ledger).
    folder = RunFolder(finished_run)
    folder.write_metrics(folder.read_metrics()[:-1])

    assert "holds no record of round 2" in _reasons(finished_run)


@pytest.mark.parametrize(
    ("line", "named"),
    [
        ("{not json", "line 4: not JSON ("),
        ('{"round": "x"}', "line 4: field 'round' is 'x', not an integer round number"),
        ('{"round": 5, "sites_ok": "many"}', "line 4: field 'sites_ok' is 'many', not a count"),
        ('{"round": 5, "gold_loss": "low"}', "line 4: field 'gold_loss' is 'low', not a number"),
        ('{"round": 5}', "line 4: round 5 is not recorded in the ledger"),
        ("[" * 100_000 + "]" * 100_000, "line 4: JSON nested too deeply"),
    ],
)
def test_a_malformed_metrics_line_is_named_by_file_line_and_field_and_still_reported(
    finished_run: Path, tmp_path: Path, line: str, named: str
) -> None:
    folder = RunFolder(finished_run)
    with folder.metrics_path.open("a", encoding="utf-8") as handle:
        handle.write(line + "\n")

    assert f"{folder.metrics_path} {named}" in _reasons(finished_run)
    out = tmp_path / "report.html"
    assert main(["audit", "report", str(finished_run), "--out", str(out)]) == 1
    assert 'class="banner fail"' in out.read_text(encoding="utf-8")


def test_a_round_json_of_another_round_fails(finished_run: Path) -> None:
    folder = RunFolder(finished_run)
    (folder.checkpoint_dir(2) / "round.json").write_text(
        (folder.checkpoint_dir(1) / "round.json").read_text()
    )

    assert "round.json: the record is of round 1, not 2" in _reasons(finished_run)
