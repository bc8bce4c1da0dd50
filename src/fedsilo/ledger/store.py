"""The ledger file: an append-only SQLite database the coordinator writes and auditors read.

``RUN/ledger.db`` holds two tables::

    entries(seq INTEGER PRIMARY KEY, kind TEXT NOT NULL, created_at TEXT NOT NULL,
            payload TEXT NOT NULL, prev_hash TEXT NOT NULL, entry_hash TEXT NOT NULL UNIQUE,
            signature TEXT NOT NULL)
    meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)
        "schema_version"          -> "1"
        "coordinator_public_key"  -> fedsilo.crypto.public_key_text(coordinator public key)

Each entry is written in its own ``BEGIN IMMEDIATE`` transaction in WAL mode with
``synchronous=FULL``, so a crash at any point leaves either the whole entry or nothing, and a
committed entry survives power loss. SQLite, not an atomically replaced file, keeps the ledger:
rewriting the whole file per event would make appends cost O(entries).
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from fedsilo.crypto import (
    KeyFileError,
    PrivateKey,
    SignatureError,
    encode_signature,
    fingerprint,
    parse_public_key,
    public_key_text,
)
from fedsilo.ledger.entries import (
    GENESIS_HASH,
    SITE_CLAIMS_FIELD,
    SITE_METRICS_FIELD,
    SITE_POLICY_FIELD,
    SITE_SIGNATURE_FIELD,
    UPDATE_BINDING_FIELDS,
    Entry,
    EntryKind,
    JsonValue,
    compute_entry_hash,
    is_timestamp,
    payload_json,
    plain_payload,
    recomputed_hash,
    sign_entry_hash,
    utc_now,
    verify_entry_signature,
)
from fedsilo.storage import open_regular_file

SCHEMA_VERSION = "1"
_KEY_META = "coordinator_public_key"
_VERSION_META = "schema_version"
_COLUMNS = "seq, kind, created_at, payload, prev_hash, entry_hash, signature"

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS entries("
    "seq INTEGER PRIMARY KEY, kind TEXT NOT NULL, created_at TEXT NOT NULL, "
    "payload TEXT NOT NULL, prev_hash TEXT NOT NULL, entry_hash TEXT NOT NULL UNIQUE, "
    "signature TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)


class LedgerError(RuntimeError):
    """The ledger file is missing, not a ledger, from another coordinator, or damaged."""


@dataclass(frozen=True)
class StoredRow:
    """One row of the entries table as stored, before any parsing (columns may be any type).

    ``seq`` is the column as stored: an integer in every ledger fedsilo writes, but a file from
    an untrusted party may hold text or NULL there, so ``position`` (1-based, in seq order)
    names the row when ``seq`` cannot.
    """

    seq: object
    values: tuple[object, ...]
    position: int = 0

    @property
    def number(self) -> int | None:
        """The row's seq when it is an integer, else None."""
        seq = self.seq
        return seq if isinstance(seq, int) and not isinstance(seq, bool) else None


@dataclass(frozen=True)
class StoredLedger:
    """Everything an auditor reads from a ledger file, unparsed."""

    coordinator_key_text: str
    rows: tuple[StoredRow, ...]


def parse_row(row: StoredRow) -> Entry:
    """The :class:`Entry` a stored row holds; LedgerError naming the seq if it is malformed.

    The payload text must be exactly the canonical JSON of the object it holds, so that every
    reader, in any language, sees the same payload the hash was made over.
    """
    seq = row.number
    if seq is None:
        raise LedgerError(
            f"row {row.position} of the entries table (in seq order): column seq is "
            f"{row.seq!r}, not an integer"
        )
    names = ("kind", "created_at", "payload", "prev_hash", "entry_hash", "signature")
    if len(row.values) != len(names):
        raise LedgerError(f"entry seq {seq}: expected {len(names)} columns")
    for name, value in zip(names, row.values, strict=True):
        if not isinstance(value, str):
            raise LedgerError(f"entry seq {seq}: column {name} is {type(value).__name__}, not text")
    kind_text, created_at, payload_text, prev_hash, entry_hash, signature = (
        str(value) for value in row.values
    )
    try:
        kind = EntryKind(kind_text)
    except ValueError:
        raise LedgerError(f"entry seq {seq}: unknown kind {kind_text!r}") from None
    try:
        payload = json.loads(payload_text, parse_constant=_refuse_constant)
        canonical = payload_json(payload) if isinstance(payload, dict) else None
    except ValueError as error:
        raise LedgerError(f"entry seq {seq}: payload is not valid JSON ({error})") from None
    except RecursionError:
        # No entry fedsilo writes nests deeply; a crafted row must not crash the verifier.
        raise LedgerError(f"entry seq {seq}: payload JSON is nested too deeply") from None
    if not isinstance(payload, dict):
        raise LedgerError(f"entry seq {seq}: payload is not a JSON object")
    if canonical != payload_text:
        raise LedgerError(f"entry seq {seq}: payload text is not in canonical JSON form")
    return Entry(
        seq=seq,
        kind=kind,
        created_at=created_at,
        payload=payload,
        prev_hash=prev_hash,
        entry_hash=entry_hash,
        signature=signature,
    )


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


# A ledger holds a few kilobytes per site and round: 4 GiB is far beyond any real run, and
# bounds what a reader copies and what the file's rows can hold.
MAX_LEDGER_BYTES = 4 * 1024**3

# What a ledger file may hold besides its two tables: their primary-key and UNIQUE indexes.
# A view or a trigger, or a generated column, would let the file compute what a reader gets
# (a 12 KB file with a recursive view yields rows without end).
_TABLE_COLUMNS = {
    "entries": ("seq", "kind", "created_at", "payload", "prev_hash", "entry_hash", "signature"),
    "meta": ("key", "value"),
}


def _checked_size(path: Path) -> int:
    """The size of the regular file ``path``, refused over :data:`MAX_LEDGER_BYTES`."""
    try:
        with open_regular_file(path, limit=MAX_LEDGER_BYTES) as handle:
            return os.fstat(handle.fileno()).st_size
    except ValueError as error:
        raise LedgerError(f"cannot read the ledger: {error}") from None


def _copy_bounded(source: Path, target: Path) -> None:
    """Copy the regular file ``source``, refusing it past :data:`MAX_LEDGER_BYTES` even if
    it grows while copied."""
    try:
        with open_regular_file(source, limit=MAX_LEDGER_BYTES) as reader, target.open("wb") as out:
            copied = 0
            while chunk := reader.read(1024**2):
                copied += len(chunk)
                if copied > MAX_LEDGER_BYTES:
                    raise LedgerError(f"{source}: over the {MAX_LEDGER_BYTES}-byte limit")
                out.write(chunk)
    except ValueError as error:
        raise LedgerError(f"cannot read the ledger: {error}") from None


def _check_schema(connection: sqlite3.Connection, path: Path) -> None:
    """Refuse a file whose schema could compute rows: only the ledger's two tables, their
    stored columns and their own indexes."""
    try:
        objects = connection.execute("SELECT type, name, tbl_name FROM sqlite_master").fetchall()
        for kind, name, table in objects:
            if kind == "table" and name in _TABLE_COLUMNS:
                columns = connection.execute(f"PRAGMA table_xinfo({name})").fetchall()
                # table_xinfo rows: cid, name, type, notnull, default, pk, hidden (0: stored).
                if tuple(row[1] for row in columns) != _TABLE_COLUMNS[name] or any(
                    row[6] for row in columns
                ):
                    raise LedgerError(f"{path}: not a fedsilo ledger (table {name} altered)")
            elif not (kind == "index" and table in _TABLE_COLUMNS):
                raise LedgerError(f"{path}: not a fedsilo ledger (it holds {kind} {name!r})")
    except sqlite3.Error as error:
        raise LedgerError(f"{path}: not a fedsilo ledger ({error})") from None


@contextmanager
def _read_only_connection(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection that cannot change anything in the ledger's folder, not even its -shm.

    An auditor's evidence folder must be byte-identical after a check. A closed ledger (no
    write-ahead log beside it) is opened ``immutable``: SQLite then takes no locks and creates
    no ``-wal`` or ``-shm`` file. A ledger with a live log (a running or crashed coordinator)
    is copied with its log into a temporary folder and read there, so committed entries still
    in the log are seen and nothing is written next to the evidence. The file may come from
    an untrusted party: it and its log are bounded in size, and its schema may hold nothing
    that computes rows (:func:`_check_schema`).
    """
    path = Path(path)
    if not path.is_file():
        raise LedgerError(f"{path}: no ledger file there")
    _checked_size(path)
    wal = path.with_name(path.name + "-wal")
    with tempfile.TemporaryDirectory(prefix="fedsilo-ledger-") as scratch:
        if wal.is_file() and _checked_size(wal) > 0:
            copy = Path(scratch) / path.name
            _copy_bounded(path, copy)
            _copy_bounded(wal, copy.with_name(copy.name + "-wal"))
            uri = f"{copy.as_uri()}?mode=ro"
        else:
            uri = f"{path.resolve().as_uri()}?mode=ro&immutable=1"
        try:
            connection = sqlite3.connect(uri, uri=True)
            # Never run functions its schema names.
            connection.execute("PRAGMA trusted_schema=OFF")
        except sqlite3.Error as error:
            raise LedgerError(f"{path}: cannot open as a ledger ({error})") from None
        try:
            _check_schema(connection, path)
            yield connection
        finally:
            connection.close()


def _read_meta(connection: sqlite3.Connection, path: Path) -> dict[str, str]:
    try:
        rows = connection.execute("SELECT key, value FROM meta").fetchall()
    except sqlite3.Error as error:
        raise LedgerError(f"{path}: not a fedsilo ledger ({error})") from None
    meta = {str(key): str(value) for key, value in rows}
    version = meta.get(_VERSION_META)
    if version is None or _KEY_META not in meta:
        raise LedgerError(f"{path}: not a fedsilo ledger (meta table lacks its fields)")
    if version != SCHEMA_VERSION:
        raise LedgerError(
            f"{path}: ledger schema version {version!r}; this fedsilo reads {SCHEMA_VERSION!r}"
        )
    return meta


def read_stored_ledger(path: Path) -> StoredLedger:
    """Read a ledger file read-only and unparsed (the auditor's view of the raw rows)."""
    path = Path(path)
    with _read_only_connection(path) as connection:
        meta = _read_meta(connection, path)
        try:
            rows = connection.execute(f"SELECT {_COLUMNS} FROM entries ORDER BY seq").fetchall()
        except sqlite3.Error as error:
            raise LedgerError(f"{path}: not a fedsilo ledger ({error})") from None
    return StoredLedger(
        coordinator_key_text=meta[_KEY_META],
        rows=tuple(
            StoredRow(seq=row[0], values=tuple(row[1:]), position=position)
            for position, row in enumerate(rows, start=1)
        ),
    )


def read_entries(path: Path) -> list[Entry]:
    """All entries of the ledger at ``path``, ordered by seq, opened read-only.

    Raises LedgerError if the file is missing, not a ledger, or holds a malformed row (naming
    its seq). This does not verify anything: see :func:`fedsilo.ledger.verify_ledger`.
    """
    return [parse_row(row) for row in read_stored_ledger(path).rows]


def read_coordinator_key_text(path: Path) -> str:
    """The coordinator public key text the ledger at ``path`` says it was written with."""
    path = Path(path)
    with _read_only_connection(path) as connection:
        return _read_meta(connection, path)[_KEY_META]


UPDATE_ENTRY_FIELDS = (
    *UPDATE_BINDING_FIELDS,
    SITE_SIGNATURE_FIELD,
    SITE_POLICY_FIELD,
    SITE_METRICS_FIELD,
    "dp_event",
    SITE_CLAIMS_FIELD,
)
"""What an ``update_received`` entry (format 2) must hold to be verifiable: the binding, the
site's signature on it, the policy it declared, and the metrics and DP event (null where none)
with the site's signature on them."""


def _check_payload(kind: EntryKind, payload: Mapping[str, JsonValue]) -> None:
    """Refuse an update entry that could never verify, before it is written."""
    if kind is EntryKind.UPDATE_RECEIVED:
        missing = [name for name in UPDATE_ENTRY_FIELDS if name not in payload]
        if missing:
            raise ValueError(f"{kind} payload lacks the fields {', '.join(missing)}")


class Ledger:
    """The coordinator's handle on ``RUN/ledger.db``: append entries, read the head.

    Open it with :meth:`open`; use it as a context manager or call :meth:`close`. Safe to
    share between threads of one process (appends are serialised).
    """

    def __init__(
        self,
        path: Path,
        connection: sqlite3.Connection,
        coordinator_key: PrivateKey,
        clock: Callable[[], str],
    ) -> None:
        """Use :meth:`Ledger.open`; this only stores what it was given."""
        self._path = path
        self._connection: sqlite3.Connection | None = connection
        self._key = coordinator_key
        self._clock = clock
        self._lock = threading.Lock()

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        coordinator_key: PrivateKey,
        clock: Callable[[], str] = utc_now,
    ) -> Ledger:
        """Create the ledger at ``path`` or continue the one there.

        Continuing checks that the ledger was written with ``coordinator_key`` and that its
        last entry's hash and signature still hold (LedgerError otherwise), so a resumed run
        extends the same chain. ``clock`` returns the ``created_at`` of each new entry.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            connection = sqlite3.connect(
                path, isolation_level=None, timeout=30.0, check_same_thread=False
            )
        except sqlite3.Error as error:
            raise LedgerError(f"{path}: cannot open the ledger ({error})") from None
        try:
            _initialise(connection, path, public_key_text(coordinator_key.public_key()))
            ledger = cls(path, connection, coordinator_key, clock)
            head = ledger.head()
            if head is not None:
                _check_head(head, coordinator_key, path)
        except BaseException:
            connection.close()
            raise
        return ledger

    @property
    def path(self) -> Path:
        """The ledger file."""
        return self._path

    def append(self, kind: EntryKind, payload: Mapping[str, JsonValue]) -> Entry:
        """Chain, sign and durably write one entry; return it as stored.

        The whole step is one transaction: if anything fails (a bad payload, the signer, the
        disk), nothing is written and the ledger is as before. Raises ValueError for a payload
        that is not canonical JSON or an ``update_received`` payload without its binding
        fields, LedgerError if the first entry is not ``run_started``.
        """
        kind = EntryKind(kind)
        plain = plain_payload(payload)
        _check_payload(kind, plain)
        with self._lock:
            connection = self._open_connection()
            connection.execute("BEGIN IMMEDIATE")
            try:
                entry = self._write_entry(connection, kind, plain)
                connection.execute("COMMIT")
            except BaseException:
                _rollback(connection)
                raise
        return entry

    def _write_entry(
        self, connection: sqlite3.Connection, kind: EntryKind, payload: dict[str, JsonValue]
    ) -> Entry:
        head = _select_head(connection)
        if head is None:
            if kind is not EntryKind.RUN_STARTED:
                raise LedgerError(
                    f"{self._path}: the first entry must be {EntryKind.RUN_STARTED}, not {kind}"
                )
            seq, prev_hash = 1, GENESIS_HASH
        else:
            seq, prev_hash = head.seq + 1, head.entry_hash
        created_at = self._clock()
        if not is_timestamp(created_at):
            raise LedgerError(
                f"clock returned {created_at!r}; expected UTC like 2025-01-31T12:00:00.000000Z"
            )
        entry_hash = compute_entry_hash(seq, kind, created_at, payload, prev_hash)
        signature = encode_signature(sign_entry_hash(self._key, seq=seq, entry_hash=entry_hash))
        entry = Entry(
            seq=seq,
            kind=kind,
            created_at=created_at,
            payload=payload,
            prev_hash=prev_hash,
            entry_hash=entry_hash,
            signature=signature,
        )
        connection.execute(
            f"INSERT INTO entries({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (seq, str(kind), created_at, payload_json(payload), prev_hash, entry_hash, signature),
        )
        return entry

    def head(self) -> Entry | None:
        """The last entry, or None for an empty ledger."""
        with self._lock:
            return _select_head(self._open_connection())

    def close(self) -> None:
        """Close the database; the write-ahead log is folded into ``ledger.db`` first."""
        with self._lock:
            if self._connection is None:
                return
            connection, self._connection = self._connection, None
            try:
                # An auditor may be handed ledger.db alone: make it self-contained.
                connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                connection.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _open_connection(self) -> sqlite3.Connection:
        if self._connection is None:
            raise LedgerError(f"{self._path}: the ledger is closed")
        return self._connection


def _initialise(connection: sqlite3.Connection, path: Path, key_text: str) -> None:
    """Set durability, create the tables if missing and check whose ledger this is."""
    try:
        tables = {
            str(row[0])
            for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        # Checked before anything is changed: another program's database is left as it was.
        if tables and not {"entries", "meta"} <= tables:
            raise LedgerError(f"{path}: a SQLite database, but not a fedsilo ledger")
        mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise LedgerError(f"{path}: the file system refused WAL journaling (mode {mode!r})")
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA:
                connection.execute(statement)
            for key, value in ((_VERSION_META, SCHEMA_VERSION), (_KEY_META, key_text)):
                connection.execute(
                    "INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)", (key, value)
                )
            connection.execute("COMMIT")
        except BaseException:
            _rollback(connection)
            raise
    except sqlite3.Error as error:
        raise LedgerError(f"{path}: cannot open the ledger ({error})") from None
    stored = _read_meta(connection, path)[_KEY_META]
    if stored != key_text:
        given = fingerprint(parse_public_key(key_text))
        raise LedgerError(
            f"{path}: this ledger belongs to coordinator key {key_fingerprint_text(stored)}, "
            f"not {given}; refusing to continue it with a different key"
        )


def key_fingerprint_text(key_text: str) -> str:
    """The fingerprint of a stored public key text, or a note that the text is not a key."""
    try:
        return fingerprint(parse_public_key(key_text, source="ledger meta"))
    except KeyFileError as error:
        return f"<invalid key text: {error}>"


def _rollback(connection: sqlite3.Connection) -> None:
    # A failed COMMIT may already have ended the transaction; a second error would hide the first.
    if connection.in_transaction:
        connection.execute("ROLLBACK")


def _select_head(connection: sqlite3.Connection) -> Entry | None:
    row = connection.execute(f"SELECT {_COLUMNS} FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
    if row is None:
        return None
    stored = StoredRow(seq=row[0], values=tuple(row[1:]))
    if stored.number is None:
        raise LedgerError(f"the ledger's last row has seq {row[0]!r}, not an integer")
    return parse_row(stored)


def _check_head(head: Entry, coordinator_key: PrivateKey, path: Path) -> None:
    if recomputed_hash(head) != head.entry_hash:
        raise LedgerError(f"{path}: entry seq {head.seq} does not match its hash; not continuing")
    try:
        verify_entry_signature(coordinator_key.public_key(), head)
    except SignatureError:
        raise LedgerError(
            f"{path}: entry seq {head.seq} is not signed by this coordinator; not continuing"
        ) from None
