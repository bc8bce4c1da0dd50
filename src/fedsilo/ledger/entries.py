"""Ledger entries and the exact recipes that chain and sign them.

An auditor re-implements these two recipes to check a ledger without trusting fedsilo.

Canonical JSON (``payload_json``): ``json.dumps(value, sort_keys=True, separators=(",", ":"),
ensure_ascii=True, allow_nan=False)``, i.e. no whitespace, keys sorted by code point, every
non-ASCII character written as a ``\\uXXXX`` escape, no NaN or infinity. Floats are written as
Python writes them (the shortest text that reads back to the same double).

Entry hash (lowercase hex)::

    entry_hash = sha256_hex(payload_json({
        "seq": seq,                 # integer, 1, 2, 3, ...
        "kind": kind,               # e.g. "update_received"
        "created_at": created_at,   # "2025-01-31T12:00:00.000000Z"
        "payload": payload,         # the entry's payload as a nested JSON object
        "prev_hash": prev_hash,     # entry_hash of entry seq - 1; GENESIS_HASH ("0" * 64) for seq 1
    }).encode("ascii"))

Entry signature: the coordinator signs the hash and the position, nothing else, with
``fedsilo.crypto.sign(coordinator_key, "ledger-entry", {"entry_hash": entry_hash, "seq": seq})``;
the ledger stores it as ``fedsilo.crypto.encode_signature(signature)`` (base64). Because the
hash covers ``prev_hash``, the signature on the last entry vouches for the whole chain.

In the database the payload column holds exactly ``payload_json(payload)``; any other text
(even an equivalent JSON spelling) is treated as tampering.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import TypeAlias

from fedsilo.crypto import PrivateKey, PublicKey, decode_signature, sha256_hex, sign, verify

JsonValue: TypeAlias = str | int | float | bool | list["JsonValue"] | dict[str, "JsonValue"] | None
"""A value that canonical JSON can hold; payloads are JSON objects of these."""

GENESIS_HASH = "0" * 64
"""The ``prev_hash`` of the first entry."""

SIGNATURE_PURPOSE = "ledger-entry"
"""The purpose string every entry signature is made for (domain separation)."""

UPDATE_BINDING_FIELDS: tuple[str, ...] = (
    "federation_id",
    "run_id",
    "round",
    "stage",
    "site_id",
    "payload_sha256",
)
"""Payload fields of an ``update_received`` entry that rebuild the site's signed binding."""

SITE_SIGNATURE_FIELD = "site_signature"
"""Payload field of an ``update_received`` entry with the site's base64 signature."""

SITE_POLICY_FIELD = "site_policy"
"""Payload field of an ``update_received`` entry with the policy the site declared it trained
under: ``{"policy_sha256": <64 hex digits, or "none">, "min_cohort": <int>, "signature":
<base64>}``, the signature being the site's (purpose ``policy-declaration``) over the entry's
update binding and those two fields."""

SITE_METRICS_FIELD = "site_metrics"
"""Payload field of an ``update_received`` entry with the metrics the site sent with the update
(:meth:`fedsilo.protocol.records.SiteMetrics.claim_fields`), or null where none are sent (secure
aggregation, HE)."""

DP_SETTINGS_FIELD = "differential_privacy"
"""Payload field of a ``run_started`` entry with the run's DP settings: ``{"record_level":
<bool>, "site_level": <bool>, "accountant": "rdp" | "pld", "delta": <float>}``, so that the
ledger alone states the accountant and delta every epsilon is computed with. Ledgers written
before it was recorded lack it."""

SITE_CLAIMS_FIELD = "site_claims"
"""Payload field of an ``update_received`` entry with the site's signature on its claims:
``{"claims_sha256": <64 hex digits>, "signature": <base64>}``, the signature being the site's
(purpose ``update-claims``) over the entry's update binding and ``claims_sha256``, which is
:func:`fedsilo.crypto.claims_sha256` of the entry's ``site_metrics`` and ``dp_event``. Entries
written before sites signed their claims (update entry format 1) lack it; format 2 has it."""

_TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")


class EntryKind(StrEnum):
    """What happened; the ``kind`` column of the ledger."""

    RUN_STARTED = "run_started"
    RUN_RESUMED = "run_resumed"
    # Round 0: the gold metrics of the initial adapter (their digest binds metrics.jsonl).
    BASELINE_EVALUATED = "baseline_evaluated"
    ROUND_OPENED = "round_opened"
    TASK_SENT = "task_sent"
    UPDATE_RECEIVED = "update_received"
    UPDATE_REJECTED = "update_rejected"
    ROUND_AGGREGATED = "round_aggregated"
    ROUND_FAILED = "round_failed"
    SECURE_AGGREGATION_STAGE = "secure_aggregation_stage"
    RUN_FINISHED = "run_finished"
    # Provenance of clustered runs and distilled adapters (docs/distillation.md).
    CLUSTERS_ASSIGNED = "clusters_assigned"
    EXPERT_FINISHED = "expert_finished"
    DISTILL_SOURCES = "distill_sources"


@dataclass(frozen=True)
class Entry:
    """One ledger entry, as stored.

    ``created_at`` is UTC ISO-8601 with microseconds and a trailing ``Z``; ``signature`` is the
    base64 text of the coordinator's Ed25519 signature (see the module docstring for what it
    covers).
    """

    seq: int
    kind: EntryKind
    created_at: str
    payload: dict[str, JsonValue]
    prev_hash: str
    entry_hash: str
    signature: str


def utc_now() -> str:
    """The current time as the ledger writes it: ``2025-01-31T12:00:00.000000Z``."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def is_timestamp(text: str) -> bool:
    """Whether ``text`` has the ledger's timestamp shape (UTC, microseconds, ``Z``)."""
    if not _TIMESTAMP.match(text):
        return False
    try:
        datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ")
    except ValueError:
        return False
    return True


def _plain_json(value: object, where: str) -> JsonValue:
    """A plain-typed copy of ``value``; refuses what canonical JSON cannot hold exactly."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"payload field {where} is {value!r}; JSON has no NaN or infinity")
        return float(value)
    if isinstance(value, list | tuple):
        return [_plain_json(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, Mapping):
        plain: dict[str, JsonValue] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"payload field {where or '<top>'} has a non-string key {key!r}")
            name = f"{where}.{key}" if where else key
            plain[str(key)] = _plain_json(item, name)
        return plain
    raise ValueError(f"payload field {where} has type {type(value).__name__}, not a JSON value")


def plain_payload(payload: Mapping[str, JsonValue]) -> dict[str, JsonValue]:
    """A copy of ``payload`` made of plain dicts, lists, str, int, float, bool and None.

    Raises ValueError naming the field for NaN, infinity, non-string keys or non-JSON types.
    """
    if not isinstance(payload, Mapping):
        raise ValueError(f"payload must be a JSON object, got {type(payload).__name__}")
    plain = _plain_json(payload, "")
    assert isinstance(plain, dict)  # a Mapping always becomes a dict
    return plain


def payload_json(payload: Mapping[str, JsonValue]) -> str:
    """Canonical JSON text of ``payload`` (the recipe is in the module docstring).

    Raises ValueError naming the field for NaN, infinity, non-string keys or non-JSON types.
    """
    return json.dumps(
        plain_payload(payload),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
        allow_nan=False,
    )


def entry_fields(
    seq: int, kind: EntryKind, created_at: str, payload: Mapping[str, JsonValue], prev_hash: str
) -> dict[str, str | int]:
    """The entry's fields as flat strings and integers (the payload as canonical JSON text).

    This is the row as the database stores it, minus the hash and signature.
    """
    return {
        "seq": seq,
        "kind": str(kind),
        "created_at": created_at,
        "payload": payload_json(payload),
        "prev_hash": prev_hash,
    }


def compute_entry_hash(
    seq: int, kind: EntryKind, created_at: str, payload: Mapping[str, JsonValue], prev_hash: str
) -> str:
    """The entry hash of the module docstring: sha256 of the canonical JSON of the entry."""
    document: dict[str, JsonValue] = {
        "seq": seq,
        "kind": str(kind),
        "created_at": created_at,
        "payload": dict(payload),
        "prev_hash": prev_hash,
    }
    return sha256_hex(payload_json(document).encode("ascii"))


def _signed_fields(seq: int, entry_hash: str) -> dict[str, str | int]:
    return {"entry_hash": entry_hash, "seq": seq}


def sign_entry_hash(coordinator_key: PrivateKey, *, seq: int, entry_hash: str) -> bytes:
    """The coordinator's signature over one entry's hash and position."""
    return sign(coordinator_key, SIGNATURE_PURPOSE, _signed_fields(seq, entry_hash))


def verify_entry_signature(coordinator_key: PublicKey, entry: Entry) -> None:
    """Check the entry's stored signature over its stored hash and seq.

    Raises ``fedsilo.crypto.SignatureError`` if it does not verify or the signature text is
    not canonical base64 of 64 bytes. It does not recompute the hash: see
    :func:`compute_entry_hash`.
    """
    signature = decode_signature(entry.signature)
    verify(
        coordinator_key,
        SIGNATURE_PURPOSE,
        _signed_fields(entry.seq, entry.entry_hash),
        signature,
    )


def recomputed_hash(entry: Entry) -> str:
    """The hash ``entry`` should carry, recomputed from its other fields."""
    return compute_entry_hash(
        entry.seq, entry.kind, entry.created_at, entry.payload, entry.prev_hash
    )
