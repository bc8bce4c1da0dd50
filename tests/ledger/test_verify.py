import sqlite3
from collections.abc import Sequence
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import pytest

from fedsilo.crypto import (
    UpdateBinding,
    encode_signature,
    fingerprint,
    public_key_text,
    sign_policy_declaration,
)
from fedsilo.ledger import (
    Entry,
    EntryKind,
    JsonValue,
    LedgerError,
    VerifyProblem,
    VerifyReport,
    compute_entry_hash,
    payload_json,
    read_entries,
    verify_entries,
    verify_ledger,
)
from fedsilo.ledger.entries import sign_entry_hash
from tests.ledger import (
    COORDINATOR_KEY,
    OTHER_KEY,
    SITE_ID,
    SITE_KEY,
    SITE_KEYS,
    UPDATE_SEQ,
    execute_sql,
    record_run,
    update_payload,
)


def audit(path: Path, **kwargs: object) -> VerifyReport:
    arguments: dict[str, object] = {
        "coordinator_key": COORDINATOR_KEY.public_key(),
        "site_keys": SITE_KEYS,
        **kwargs,
    }
    return verify_ledger(path, **arguments)  # type: ignore[arg-type]


def problem_seqs(report: VerifyReport) -> list[int | None]:
    return [problem.seq for problem in report.problems]


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.db"
    record_run(path)
    return path


def test_untouched_ledger_verifies(ledger_path: Path) -> None:
    report = audit(ledger_path)

    assert report.ok
    assert report.entries == 6
    assert report.first_problem is None
    assert report.coordinator_fingerprint == fingerprint(COORDINATOR_KEY.public_key())


def test_edited_payload_is_caught_at_its_seq(ledger_path: Path) -> None:
    execute_sql(ledger_path, "UPDATE entries SET payload = ? WHERE seq = 3", ('{"round":2}',))

    report = audit(ledger_path)

    assert problem_seqs(report) == [3]
    assert "entry_hash does not match" in report.problems[0].reason


def test_a_payload_nested_too_deeply_is_reported_at_its_seq(ledger_path: Path) -> None:
    deep = '{"a":' + "[" * 100_000 + "]" * 100_000 + "}"
    execute_sql(ledger_path, "UPDATE entries SET payload = ? WHERE seq = 3", (deep,))

    report = audit(ledger_path)

    assert problem_seqs(report)[:1] == [3]
    assert "nested too deeply" in report.problems[0].reason


def test_edited_payload_with_recomputed_hash_is_caught(ledger_path: Path) -> None:
    original = read_entries(ledger_path)[2]
    forged_payload: dict[str, JsonValue] = {"round": 1, "site_id": "someone-else"}
    forged_hash = compute_entry_hash(
        3, original.kind, original.created_at, forged_payload, original.prev_hash
    )
    execute_sql(
        ledger_path,
        "UPDATE entries SET payload = ?, entry_hash = ? WHERE seq = 3",
        (payload_json(forged_payload), forged_hash),
    )

    report = audit(ledger_path)

    assert problem_seqs(report) == [3, 4]
    assert "coordinator signature" in report.problems[0].reason
    assert "prev_hash" in report.problems[1].reason


def test_deleted_middle_entry_is_caught_at_the_next_seq(ledger_path: Path) -> None:
    execute_sql(ledger_path, "DELETE FROM entries WHERE seq = 3")

    report = audit(ledger_path)

    assert report.first_problem is not None
    assert report.first_problem.seq == 4
    assert "where 3 was expected" in report.first_problem.reason


def test_deleted_last_entry_cannot_be_detected_from_the_chain_alone(ledger_path: Path) -> None:
    # Truncation leaves a valid shorter chain: the run_finished entry (or a receipt a site holds)
    # is what shows it; this test pins down that limit so nobody believes otherwise.
    execute_sql(ledger_path, "DELETE FROM entries WHERE seq = 6")

    assert audit(ledger_path).ok


def test_swapped_entries_are_caught_at_the_first_of_them(ledger_path: Path) -> None:
    execute_sql(ledger_path, "UPDATE entries SET seq = -1 WHERE seq = 3")
    execute_sql(ledger_path, "UPDATE entries SET seq = 3 WHERE seq = 2")
    execute_sql(ledger_path, "UPDATE entries SET seq = 2 WHERE seq = -1")

    report = audit(ledger_path)

    assert report.first_problem is not None
    assert report.first_problem.seq == 2
    assert set(problem_seqs(report)) == {2, 3, 4}


def forged_entry(after: Entry) -> Entry:
    """A well-formed entry chained after ``after`` but signed with someone else's key."""
    payload: dict[str, JsonValue] = {"status": "completed", "note": "forged"}
    seq = after.seq + 1
    entry_hash = compute_entry_hash(
        seq, EntryKind.RUN_FINISHED, after.created_at, payload, after.entry_hash
    )
    return Entry(
        seq=seq,
        kind=EntryKind.RUN_FINISHED,
        created_at=after.created_at,
        payload=payload,
        prev_hash=after.entry_hash,
        entry_hash=entry_hash,
        signature=encode_signature(sign_entry_hash(OTHER_KEY, seq=seq, entry_hash=entry_hash)),
    )


def test_appended_entry_signed_by_another_key_is_caught(ledger_path: Path) -> None:
    forged = forged_entry(read_entries(ledger_path)[-1])
    execute_sql(
        ledger_path,
        "INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            forged.seq,
            str(forged.kind),
            forged.created_at,
            payload_json(forged.payload),
            forged.prev_hash,
            forged.entry_hash,
            forged.signature,
        ),
    )

    report = audit(ledger_path)

    assert problem_seqs(report) == [7]
    assert "coordinator signature" in report.problems[0].reason


def test_chain_resigned_with_another_key_fails_against_the_pinned_key(tmp_path: Path) -> None:
    record_run(tmp_path / "ledger.db", coordinator_key=OTHER_KEY)

    report = audit(tmp_path / "ledger.db")

    assert report.first_problem is not None
    assert report.first_problem.seq is None
    assert fingerprint(OTHER_KEY.public_key()) in report.first_problem.reason
    assert fingerprint(COORDINATOR_KEY.public_key()) in report.first_problem.reason
    assert problem_seqs(report)[1:] == [1, 2, 3, 4, 5, 6]


def test_resigned_chain_with_original_meta_fails_at_seq_1(tmp_path: Path) -> None:
    record_run(tmp_path / "ledger.db", coordinator_key=OTHER_KEY)
    execute_sql(
        tmp_path / "ledger.db",
        "UPDATE meta SET value = ? WHERE key = 'coordinator_public_key'",
        (public_key_text(COORDINATOR_KEY.public_key()),),
    )

    report = audit(tmp_path / "ledger.db")

    assert problem_seqs(report) == [1, 2, 3, 4, 5, 6]


def test_update_with_bad_site_signature_is_caught(tmp_path: Path) -> None:
    record_run(tmp_path / "ledger.db", update=update_payload(site_key=OTHER_KEY))

    report = audit(tmp_path / "ledger.db")

    assert problem_seqs(report) == [UPDATE_SEQ]
    assert f"site {SITE_ID!r} signature" in report.problems[0].reason


def _with_policy(claimed_cohort: int) -> dict[str, JsonValue]:
    """An update payload whose site signed a declaration of min_cohort 3; the entry claims
    ``claimed_cohort``."""
    update = update_payload()
    binding = UpdateBinding(**{k: update[k] for k in UpdateBinding.__dataclass_fields__})  # type: ignore[arg-type]
    signed = {"policy_sha256": "ef" * 32, "min_cohort": 3}
    signature = encode_signature(sign_policy_declaration(SITE_KEY, binding, signed))
    claimed = {**signed, "min_cohort": claimed_cohort, "signature": signature}
    return {**update, "site_policy": claimed}


def test_policy_declaration_the_site_signed_verifies(tmp_path: Path) -> None:
    record_run(tmp_path / "ledger.db", update=_with_policy(3))

    assert audit(tmp_path / "ledger.db").ok


def test_policy_declaration_the_site_did_not_sign_is_caught(tmp_path: Path) -> None:
    # The coordinator ledgers (and signs) a stricter cohort than the site declared.
    record_run(tmp_path / "ledger.db", update=_with_policy(5))

    report = audit(tmp_path / "ledger.db")

    assert problem_seqs(report) == [UPDATE_SEQ]
    assert f"site {SITE_ID!r} policy declaration signature is invalid" in report.problems[0].reason


def test_update_from_unknown_site_is_caught(ledger_path: Path) -> None:
    report = audit(ledger_path, site_keys={})

    assert problem_seqs(report) == [UPDATE_SEQ]
    assert "unknown site" in report.problems[0].reason


def test_update_with_wrongly_typed_binding_field_is_caught(ledger_path: Path) -> None:
    entries = read_entries(ledger_path)
    update = entries[UPDATE_SEQ - 1]
    bad = replace(update, payload={**update.payload, "round": "1"})

    report = verify_entries(
        [*entries[: UPDATE_SEQ - 1], bad, *entries[UPDATE_SEQ:]],
        coordinator_key=COORDINATOR_KEY.public_key(),
        site_keys=SITE_KEYS,
    )

    assert "wrong type: round" in " ".join(p.reason for p in report.problems)


def test_row_with_unknown_kind_is_reported_at_its_seq(ledger_path: Path) -> None:
    execute_sql(ledger_path, "UPDATE entries SET kind = 'bribe_paid' WHERE seq = 2")

    report = audit(ledger_path)

    assert report.first_problem is not None
    assert report.first_problem.seq == 2
    assert "unknown kind" in report.first_problem.reason


def test_non_canonical_payload_text_is_reported(ledger_path: Path) -> None:
    execute_sql(ledger_path, "UPDATE entries SET payload = ? WHERE seq = 2", ('{"round": 1}',))

    report = audit(ledger_path)

    assert report.first_problem == VerifyProblem(
        2, "entry seq 2: payload text is not in canonical JSON form"
    )


def test_first_entry_that_is_not_run_started_is_caught(ledger_path: Path) -> None:
    execute_sql(ledger_path, "DELETE FROM entries WHERE seq = 1")

    report = audit(ledger_path)

    assert report.first_problem is not None
    assert report.first_problem.seq == 2
    assert any("not run_started" in p.reason for p in report.problems)


def test_empty_ledger_is_a_problem(tmp_path: Path) -> None:
    report = verify_entries([], coordinator_key=COORDINATOR_KEY.public_key(), site_keys=SITE_KEYS)

    assert not report.ok
    assert report.first_problem == VerifyProblem(None, "the ledger has no entries")


def test_extra_check_problems_are_reported(ledger_path: Path) -> None:
    seen: list[int] = []

    def digest_check(entries: Sequence[Entry]) -> list[VerifyProblem]:
        seen.append(len(entries))
        return [VerifyProblem(5, "aggregate digest differs from checkpoint round-1")]

    report = audit(ledger_path, extra_checks=[digest_check])

    assert seen == [6]
    assert report.problems == (
        VerifyProblem(5, "aggregate digest differs from checkpoint round-1"),
    )


def test_problems_are_ordered_by_seq(ledger_path: Path) -> None:
    execute_sql(ledger_path, "UPDATE entries SET payload = '{}' WHERE seq = 5")

    def late_check(entries: Sequence[Entry]) -> list[VerifyProblem]:
        return [VerifyProblem(1, "found last, reported first")]

    report = audit(ledger_path, extra_checks=[late_check])

    assert problem_seqs(report) == [1, 5]


def test_missing_ledger_file_raises(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="no ledger file"):
        audit(tmp_path / "ledger.db")


@pytest.mark.parametrize("stored", ["'abc'", "NULL"])
def test_a_row_whose_seq_is_not_an_integer_is_a_problem_naming_the_row(
    ledger_path: Path, stored: str
) -> None:
    # fedsilo's table makes seq an INTEGER PRIMARY KEY; a file from elsewhere need not.
    with closing(sqlite3.connect(ledger_path)) as connection, connection:
        connection.executescript(
            "ALTER TABLE entries RENAME TO old; "
            "CREATE TABLE entries(seq, kind TEXT, created_at TEXT, payload TEXT, "
            "prev_hash TEXT, entry_hash TEXT, signature TEXT); "
            "INSERT INTO entries SELECT * FROM old; DROP TABLE old; "
            f"UPDATE entries SET seq = {stored} WHERE seq = 3;"
        )

    report = audit(ledger_path)

    assert not report.ok
    first = report.first_problem
    assert first is not None and first.seq is None
    assert "of the entries table (in seq order): column seq is " in first.reason
    assert "not an integer" in first.reason
    with pytest.raises(LedgerError, match=r"column seq is .*, not an integer"):
        read_entries(ledger_path)
