import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from fedsilo.crypto import fingerprint, public_key_text
from fedsilo.ledger import (
    GENESIS_HASH,
    EntryKind,
    JsonValue,
    Ledger,
    LedgerError,
    read_coordinator_key_text,
    read_entries,
    verify_ledger,
)
from tests.ledger import (
    COORDINATOR_KEY,
    OTHER_KEY,
    SITE_KEYS,
    execute_sql,
    fixed_clock,
    record_run,
    update_payload,
)

SIGNER = "fedsilo.ledger.store.sign_entry_hash"
KAT_HASH = "06af43c1b403d223b2d3f967e33e932c87972aabd71af11f686577ff5cd47135"


def open_ledger(path: Path) -> Ledger:
    return Ledger.open(path, coordinator_key=COORDINATOR_KEY, clock=fixed_clock())


def test_first_entry_hash_matches_known_answer(tmp_path: Path) -> None:
    payload: dict[str, JsonValue] = {
        "run_id": "run-1",
        "coordinator": "H\u00f4pital Nord",
        "noise_multiplier": 1.5,
        "sites": ["a", "b"],
        "resumed": False,
        "note": None,
    }
    with open_ledger(tmp_path / "ledger.db") as ledger:
        entry = ledger.append(EntryKind.RUN_STARTED, payload)

    assert entry.entry_hash == KAT_HASH
    assert entry.prev_hash == GENESIS_HASH


def test_entries_chain_each_to_the_previous_hash(tmp_path: Path) -> None:
    record_run(tmp_path / "ledger.db")

    entries = read_entries(tmp_path / "ledger.db")

    assert [e.seq for e in entries] == [1, 2, 3, 4, 5, 6]
    assert [e.prev_hash for e in entries[1:]] == [e.entry_hash for e in entries[:-1]]


def test_appended_entry_reads_back_equal(tmp_path: Path) -> None:
    with open_ledger(tmp_path / "ledger.db") as ledger:
        written = ledger.append(EntryKind.RUN_STARTED, {"steps": (1, 2), "name": "x"})  # type: ignore[dict-item]

    assert read_entries(tmp_path / "ledger.db") == [written]
    assert written.payload == {"steps": [1, 2], "name": "x"}


def test_head_is_the_last_entry(tmp_path: Path) -> None:
    with open_ledger(tmp_path / "ledger.db") as ledger:
        assert ledger.head() is None
        ledger.append(EntryKind.RUN_STARTED, {})
        last = ledger.append(EntryKind.ROUND_OPENED, {"round": 1})

        assert ledger.head() == last


def test_database_uses_wal_journal(tmp_path: Path) -> None:
    record_run(tmp_path / "ledger.db")

    with closing(sqlite3.connect(tmp_path / "ledger.db")) as connection:
        mode = connection.execute("PRAGMA journal_mode").fetchone()[0]

    assert mode == "wal"


def test_closed_ledger_is_a_single_self_contained_file(tmp_path: Path) -> None:
    record_run(tmp_path / "ledger.db")

    assert [p.name for p in tmp_path.iterdir()] == ["ledger.db"]
    assert len(read_entries(tmp_path / "ledger.db")) == 6


def test_open_ledger_can_be_read_by_an_auditor(tmp_path: Path) -> None:
    with open_ledger(tmp_path / "ledger.db") as ledger:
        written = ledger.append(EntryKind.RUN_STARTED, {})

        assert read_entries(tmp_path / "ledger.db") == [written]


def test_reopen_continues_the_chain(tmp_path: Path) -> None:
    record_run(tmp_path / "ledger.db")
    before = read_entries(tmp_path / "ledger.db")[-1]

    with open_ledger(tmp_path / "ledger.db") as ledger:
        resumed = ledger.append(EntryKind.RUN_RESUMED, {"from_round": 1})

    assert (resumed.seq, resumed.prev_hash) == (before.seq + 1, before.entry_hash)
    assert verify_ledger(
        tmp_path / "ledger.db", coordinator_key=COORDINATOR_KEY.public_key(), site_keys=SITE_KEYS
    ).ok


def test_open_with_another_coordinator_key_is_refused(tmp_path: Path) -> None:
    record_run(tmp_path / "ledger.db")

    with pytest.raises(LedgerError) as raised:
        Ledger.open(tmp_path / "ledger.db", coordinator_key=OTHER_KEY)

    assert fingerprint(COORDINATOR_KEY.public_key()) in str(raised.value)
    assert fingerprint(OTHER_KEY.public_key()) in str(raised.value)


def test_open_refuses_a_head_that_does_not_match_its_hash(tmp_path: Path) -> None:
    record_run(tmp_path / "ledger.db")
    execute_sql(tmp_path / "ledger.db", "UPDATE entries SET payload = '{}' WHERE seq = 6")

    with pytest.raises(LedgerError, match="seq 6 does not match its hash"):
        open_ledger(tmp_path / "ledger.db")


def test_failure_inside_append_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record_run(tmp_path / "ledger.db")

    def broken_signer(*args: object, **kwargs: object) -> bytes:
        raise OSError("signing device unplugged")

    with open_ledger(tmp_path / "ledger.db") as ledger:
        monkeypatch.setattr(SIGNER, broken_signer)
        with pytest.raises(OSError, match="unplugged"):
            ledger.append(EntryKind.RUN_RESUMED, {})

    assert len(read_entries(tmp_path / "ledger.db")) == 6
    assert verify_ledger(
        tmp_path / "ledger.db", coordinator_key=COORDINATOR_KEY.public_key(), site_keys=SITE_KEYS
    ).ok


def test_reopen_after_failed_append_continues_at_the_next_seq(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record_run(tmp_path / "ledger.db")

    def broken_signer(*args: object, **kwargs: object) -> bytes:
        raise OSError("signing device unplugged")

    with open_ledger(tmp_path / "ledger.db") as ledger:
        monkeypatch.setattr(SIGNER, broken_signer)
        with pytest.raises(OSError):
            ledger.append(EntryKind.RUN_RESUMED, {})
    monkeypatch.undo()

    with open_ledger(tmp_path / "ledger.db") as ledger:
        entry = ledger.append(EntryKind.RUN_RESUMED, {})

    assert entry.seq == 7


def test_first_entry_must_be_run_started(tmp_path: Path) -> None:
    with (
        open_ledger(tmp_path / "ledger.db") as ledger,
        pytest.raises(LedgerError, match="first entry must be run_started"),
    ):
        ledger.append(EntryKind.ROUND_OPENED, {"round": 1})


def test_update_entry_without_binding_fields_is_refused(tmp_path: Path) -> None:
    payload = update_payload()
    del payload["payload_sha256"]
    with open_ledger(tmp_path / "ledger.db") as ledger:
        ledger.append(EntryKind.RUN_STARTED, {})

        with pytest.raises(ValueError, match="payload_sha256"):
            ledger.append(EntryKind.UPDATE_RECEIVED, payload)


@pytest.mark.parametrize("field", ["site_claims", "site_metrics", "dp_event", "site_policy"])
def test_update_entry_without_its_signed_claims_is_refused(tmp_path: Path, field: str) -> None:
    payload = update_payload()
    del payload[field]
    with open_ledger(tmp_path / "ledger.db") as ledger:
        ledger.append(EntryKind.RUN_STARTED, {})

        with pytest.raises(ValueError, match=f"lacks the fields {field}"):
            ledger.append(EntryKind.UPDATE_RECEIVED, payload)
        head = ledger.head()

    assert head is not None and head.seq == 1


def test_non_finite_payload_is_refused_and_not_written(tmp_path: Path) -> None:
    with open_ledger(tmp_path / "ledger.db") as ledger:
        ledger.append(EntryKind.RUN_STARTED, {})

        with pytest.raises(ValueError, match="train_loss"):
            ledger.append(EntryKind.ROUND_AGGREGATED, {"train_loss": float("nan")})
        head = ledger.head()

    assert head is not None and head.seq == 1


def test_malformed_clock_output_is_refused(tmp_path: Path) -> None:
    with (
        Ledger.open(
            tmp_path / "ledger.db", coordinator_key=COORDINATOR_KEY, clock=lambda: "yesterday"
        ) as ledger,
        pytest.raises(LedgerError, match="yesterday"),
    ):
        ledger.append(EntryKind.RUN_STARTED, {})


def test_append_after_close_is_refused(tmp_path: Path) -> None:
    ledger = open_ledger(tmp_path / "ledger.db")
    ledger.close()

    with pytest.raises(LedgerError, match="closed"):
        ledger.append(EntryKind.RUN_STARTED, {})


def test_coordinator_key_text_is_recorded(tmp_path: Path) -> None:
    record_run(tmp_path / "ledger.db")

    text = read_coordinator_key_text(tmp_path / "ledger.db")

    assert text == public_key_text(COORDINATOR_KEY.public_key())


def test_reading_a_missing_ledger_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match=r"missing\.db"):
        read_entries(tmp_path / "missing.db")


def test_reading_does_not_create_a_file(tmp_path: Path) -> None:
    with pytest.raises(LedgerError):
        read_entries(tmp_path / "missing.db")

    assert list(tmp_path.iterdir()) == []


def test_reading_a_file_that_is_not_sqlite_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ledger.db").write_bytes(b"not a database at all" * 10)

    with pytest.raises(LedgerError, match=r"ledger\.db"):
        read_entries(tmp_path / "ledger.db")


def test_reading_another_sqlite_database_is_refused(tmp_path: Path) -> None:
    execute_sql(tmp_path / "other.db", "CREATE TABLE t(x)")

    with pytest.raises(LedgerError, match="not a fedsilo ledger"):
        read_entries(tmp_path / "other.db")


def test_opening_a_file_that_is_not_sqlite_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ledger.db").write_bytes(b"not a database at all" * 10)

    with pytest.raises(LedgerError, match="cannot open the ledger"):
        open_ledger(tmp_path / "ledger.db")


def test_opening_another_sqlite_database_is_refused(tmp_path: Path) -> None:
    execute_sql(tmp_path / "other.db", "CREATE TABLE t(x)")

    with pytest.raises(LedgerError, match="not a fedsilo ledger"):
        open_ledger(tmp_path / "other.db")


def test_refused_database_is_left_unchanged(tmp_path: Path) -> None:
    execute_sql(tmp_path / "other.db", "CREATE TABLE t(x)")

    with pytest.raises(LedgerError):
        open_ledger(tmp_path / "other.db")

    with closing(sqlite3.connect(tmp_path / "other.db")) as connection:
        mode = connection.execute("PRAGMA journal_mode").fetchone()[0]
        tables = connection.execute("SELECT name FROM sqlite_master").fetchall()
    assert (mode, tables) == ("delete", [("t",)])


def test_reading_a_row_with_unknown_kind_names_its_seq(tmp_path: Path) -> None:
    record_run(tmp_path / "ledger.db")
    execute_sql(tmp_path / "ledger.db", "UPDATE entries SET kind = 'bribe_paid' WHERE seq = 2")

    with pytest.raises(LedgerError, match="seq 2: unknown kind 'bribe_paid'"):
        read_entries(tmp_path / "ledger.db")


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_reading_a_closed_ledger_changes_nothing_in_its_folder(tmp_path: Path) -> None:
    record_run(tmp_path / "ledger.db")
    before = _folder_bytes(tmp_path)

    read_entries(tmp_path / "ledger.db")
    verify_ledger(
        tmp_path / "ledger.db",
        coordinator_key=COORDINATOR_KEY.public_key(),
        site_keys=SITE_KEYS,
    )
    read_coordinator_key_text(tmp_path / "ledger.db")

    assert _folder_bytes(tmp_path) == before  # no -wal or -shm, no byte changed


def test_reading_a_live_ledger_sees_its_log_and_changes_nothing(tmp_path: Path) -> None:
    with open_ledger(tmp_path / "ledger.db") as ledger:
        written = [
            ledger.append(EntryKind.RUN_STARTED, {}),
            ledger.append(EntryKind.ROUND_OPENED, {}),
        ]
        assert (tmp_path / "ledger.db-wal").stat().st_size > 0  # the entries are in the log
        before = _folder_bytes(tmp_path)

        assert read_entries(tmp_path / "ledger.db") == written
        assert _folder_bytes(tmp_path) == before


RECURSIVE_VIEW = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema_version', '1'), ('coordinator_public_key', 'ed25519:x');
CREATE VIEW entries AS WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r)
SELECT n AS seq, 'run_started' AS kind, '' AS created_at, zeroblob(1000000) AS payload,
       '' AS prev_hash, '' AS entry_hash, '' AS signature FROM r;
"""


def test_a_ledger_whose_entries_are_a_view_without_end_is_refused_before_any_row(
    tmp_path: Path,
) -> None:
    # A few kilobytes on disk; read as rows, it never ends (1 MB per row).
    path = tmp_path / "ledger.db"
    with closing(sqlite3.connect(path)) as connection:
        connection.executescript(RECURSIVE_VIEW)
    assert path.stat().st_size < 64 * 1024

    with pytest.raises(LedgerError, match=r"not a fedsilo ledger \(it holds view 'entries'\)"):
        read_entries(path)
    with pytest.raises(LedgerError, match="view 'entries'"):
        read_coordinator_key_text(path)


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        (
            "ALTER TABLE entries ADD COLUMN padding TEXT "
            "GENERATED ALWAYS AS (zeroblob(1000000)) VIRTUAL",
            r"table entries altered",
        ),
        ("CREATE TRIGGER noisy AFTER INSERT ON meta BEGIN SELECT 1; END", "trigger 'noisy'"),
        ("CREATE TABLE extra(x)", "table 'extra'"),
    ],
    ids=["generated-column", "trigger", "extra-table"],
)
def test_a_ledger_schema_that_could_compute_rows_is_refused(
    tmp_path: Path, sql: str, reason: str
) -> None:
    record_run(tmp_path / "ledger.db")
    execute_sql(tmp_path / "ledger.db", sql)

    with pytest.raises(LedgerError, match=reason):
        read_entries(tmp_path / "ledger.db")


def test_a_ledger_or_log_over_the_size_limit_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record_run(tmp_path / "ledger.db")
    size = (tmp_path / "ledger.db").stat().st_size
    monkeypatch.setattr("fedsilo.ledger.store.MAX_LEDGER_BYTES", size - 1)

    with pytest.raises(LedgerError, match=rf"ledger\.db: {size} bytes, over the {size - 1}-byte"):
        read_entries(tmp_path / "ledger.db")

    monkeypatch.setattr("fedsilo.ledger.store.MAX_LEDGER_BYTES", size)
    assert len(read_entries(tmp_path / "ledger.db")) == 6
    # A live ledger's log is held to the same limit.
    with open_ledger(tmp_path / "live.db") as ledger:
        ledger.append(EntryKind.RUN_STARTED, {"run_id": "r"})
        wal = tmp_path / "live.db-wal"
        assert wal.stat().st_size > 0
        monkeypatch.setattr("fedsilo.ledger.store.MAX_LEDGER_BYTES", wal.stat().st_size - 1)
        with pytest.raises(LedgerError, match=r"live\.db-wal: \d+ bytes, over the"):
            read_entries(tmp_path / "live.db")
