"""Ledger tests, and the small builders they share (keys, a fixed clock, a recorded run)."""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

from fedsilo.crypto import (
    PrivateKey,
    PublicKey,
    UpdateBinding,
    claims_sha256,
    encode_signature,
    private_key_from_seed,
    sign_claims,
    sign_policy_declaration,
    sign_update,
)
from fedsilo.ledger import EntryKind, JsonValue, Ledger

COORDINATOR_KEY: PrivateKey = private_key_from_seed(bytes(32))
OTHER_KEY: PrivateKey = private_key_from_seed(bytes([9]) * 32)
SITE_ID = "st-mary"
SITE_KEY: PrivateKey = private_key_from_seed(bytes([1]) * 32)
SITE_KEYS: dict[str, PublicKey] = {SITE_ID: SITE_KEY.public_key()}
UPDATE_SEQ = 4
"""The seq of the update_received entry in :func:`record_run`."""


def fixed_clock() -> Callable[[], str]:
    """A clock that ticks one microsecond per call from 2025-01-01T00:00:00Z."""
    ticks: Iterator[int] = itertools.count()
    return lambda: f"2025-01-01T00:00:00.{next(ticks):06d}Z"


def update_payload(
    *,
    site_key: PrivateKey = SITE_KEY,
    site_id: str = SITE_ID,
    federation_id: str = "fed-1",
    run_id: str = "run-1",
) -> dict[str, JsonValue]:
    """An update_received payload whose binding, policy declaration (none) and claims (metrics,
    no DP event) ``site_key`` signed, for ``federation_id`` and ``run_id`` (those of
    :func:`record_run` by default)."""
    binding = UpdateBinding(
        federation_id=federation_id,
        run_id=run_id,
        round=1,
        stage="train",
        site_id=site_id,
        payload_sha256="ab" * 32,
    )
    signature = encode_signature(sign_update(site_key, binding))
    metrics: dict[str, JsonValue] = {
        "num_examples": 64,
        "train_loss": 1.25,
        "tokens": 4096,
        "seconds": 2.5,
        "precision": "fp32",
        "padding_share": None,
    }
    digest = claims_sha256(metrics=metrics, dp_event=None)
    claims: dict[str, JsonValue] = {
        "claims_sha256": digest,
        "signature": encode_signature(sign_claims(site_key, binding, digest)),
    }
    declared: dict[str, str | int] = {"policy_sha256": "none", "min_cohort": 1}
    policy: dict[str, JsonValue] = {
        **declared,
        "signature": encode_signature(sign_policy_declaration(site_key, binding, declared)),
    }
    return {
        **binding.fields(),
        "site_signature": signature,
        "num_examples": 64,
        "dp_event": None,
        "site_policy": policy,
        "site_metrics": metrics,
        "site_claims": claims,
    }


def record_run(
    path: Path,
    *,
    coordinator_key: PrivateKey = COORDINATOR_KEY,
    update: dict[str, JsonValue] | None = None,
) -> None:
    """Write a six-entry, one-round run to the ledger at ``path``."""
    with Ledger.open(path, coordinator_key=coordinator_key, clock=fixed_clock()) as ledger:
        ledger.append(
            EntryKind.RUN_STARTED, {"federation_id": "fed-1", "run_id": "run-1", "rounds": 1}
        )
        ledger.append(EntryKind.ROUND_OPENED, {"round": 1})
        ledger.append(EntryKind.TASK_SENT, {"round": 1, "site_id": SITE_ID})
        ledger.append(EntryKind.UPDATE_RECEIVED, update or update_payload())
        ledger.append(EntryKind.ROUND_AGGREGATED, {"round": 1, "digest": "cd" * 32})
        ledger.append(EntryKind.RUN_FINISHED, {"status": "completed"})


def execute_sql(path: Path, statement: str, parameters: tuple[object, ...] = ()) -> None:
    """Change the database behind the ledger's back, as an attacker with file access would."""
    with closing(sqlite3.connect(path)) as connection, connection:
        connection.execute(statement, parameters)
