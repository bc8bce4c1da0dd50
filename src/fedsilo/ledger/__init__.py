"""The run's audit ledger: append-only, hash-chained, coordinator-signed entries in SQLite.

The coordinator appends one entry per event of a federated run to ``RUN/ledger.db``
(:class:`Ledger`); an auditor who pins the coordinator's public key checks it offline
(:func:`verify_ledger`), so an edited, deleted, reordered or forged entry is detected.
"""

from fedsilo.ledger.entries import (
    GENESIS_HASH,
    SIGNATURE_PURPOSE,
    SITE_SIGNATURE_FIELD,
    UPDATE_BINDING_FIELDS,
    Entry,
    EntryKind,
    JsonValue,
    compute_entry_hash,
    entry_fields,
    payload_json,
    utc_now,
    verify_entry_signature,
)
from fedsilo.ledger.store import Ledger, LedgerError, read_coordinator_key_text, read_entries
from fedsilo.ledger.verify import (
    ExtraCheck,
    VerifyProblem,
    VerifyReport,
    verify_entries,
    verify_ledger,
)

__all__ = [
    "GENESIS_HASH",
    "SIGNATURE_PURPOSE",
    "SITE_SIGNATURE_FIELD",
    "UPDATE_BINDING_FIELDS",
    "Entry",
    "EntryKind",
    "ExtraCheck",
    "JsonValue",
    "Ledger",
    "LedgerError",
    "VerifyProblem",
    "VerifyReport",
    "compute_entry_hash",
    "entry_fields",
    "payload_json",
    "read_coordinator_key_text",
    "read_entries",
    "utc_now",
    "verify_entries",
    "verify_entry_signature",
    "verify_ledger",
]
