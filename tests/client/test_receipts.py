"""A site keeps the coordinator's receipts for its updates: where, and what it refuses."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from fedsilo.client.receipts import keep_receipt, receipt_path, remember_sent, sent_path
from fedsilo.crypto import (
    Receipt,
    UpdateBinding,
    private_key_from_seed,
    sha256_hex,
    sign_receipt,
)
from fedsilo.protocol.records import receipt_from_record, receipt_to_record

COORDINATOR_KEY = private_key_from_seed(bytes(range(32)))
BINDING = UpdateBinding(
    federation_id="fed",
    run_id="0123abcd",
    round=2,
    site_id="alpha",
    stage="train",
    payload_sha256=sha256_hex(b"update"),
)


def _site(receipts_dir: Path) -> Any:
    """Only the site's name, coordinator key and receipts folder are used."""
    return SimpleNamespace(
        name="alpha", coordinator_key=COORDINATOR_KEY.public_key(), receipts_dir=receipts_dir
    )


def _deliver(
    receipts_dir: Path, binding: UpdateBinding, *, seq: int = 7, sent: bool = True
) -> None:
    """A receipt signed by the coordinator, as it arrives (through the message record), for
    an update the site sent (``sent``) or not."""
    if sent:
        remember_sent(_site(receipts_dir), binding)
    receipt = Receipt(binding=binding, ledger_seq=seq, entry_hash=sha256_hex(b"entry %d" % seq))
    arrived = receipt_from_record(
        receipt_to_record(receipt, sign_receipt(COORDINATOR_KEY, receipt))
    )
    keep_receipt(_site(receipts_dir), *arrived)


def test_receipts_of_each_run_are_kept_apart(tmp_path: Path) -> None:
    receipts = tmp_path / "receipts"
    _deliver(receipts, BINDING)
    _deliver(receipts, dataclasses.replace(BINDING, run_id="4567ef"))

    kept = sorted(str(p.relative_to(receipts)) for p in receipts.rglob("*.json"))
    assert kept == ["0123abcd/round-2-train.json", "4567ef/round-2-train.json"]
    assert sent_path(receipts, BINDING) == tmp_path / "sent-updates" / kept[0]
    assert json.loads((receipts / kept[0]).read_text())["ledger_seq"] == 7


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("stage", "x/../../privacy-spent"),
        ("stage", "Train"),
        ("run_id", "../state"),
        ("run_id", ""),
        ("round", -1),
    ],
)
def test_a_signed_receipt_naming_a_path_is_refused_and_writes_nothing(
    tmp_path: Path, field: str, value: object
) -> None:
    hostile = dataclasses.replace(BINDING, **{field: value})
    receipts = tmp_path / "state" / "receipts"

    with pytest.raises(ValueError, match=f"receipt: {field}"):
        _deliver(receipts, hostile, sent=False)
    assert not any(tmp_path.rglob("*.json"))


def test_a_kept_receipt_is_never_replaced_by_another(tmp_path: Path) -> None:
    receipts = tmp_path / "receipts"
    _deliver(receipts, BINDING, seq=7)
    _deliver(receipts, BINDING, seq=7)  # delivered again: the same receipt, kept

    with pytest.raises(ValueError, match="already holds another receipt"):
        _deliver(receipts, BINDING, seq=8)
    assert json.loads(receipt_path(receipts, BINDING).read_text())["ledger_seq"] == 7


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("payload_sha256", sha256_hex(b"another update")),
        ("federation_id", "other-fed"),
        ("round", 3),
    ],
)
def test_a_receipt_for_an_update_the_site_never_sent_is_refused(
    tmp_path: Path, field: str, value: object
) -> None:
    receipts = tmp_path / "receipts"
    remember_sent(_site(receipts), BINDING)
    other = dataclasses.replace(BINDING, **{field: value})

    with pytest.raises(ValueError, match="this site sent no such update"):
        _deliver(receipts, other, sent=False)
    assert not receipts.exists()


def test_a_round_asked_again_has_a_receipt_for_either_update(tmp_path: Path) -> None:
    receipts = tmp_path / "receipts"
    again = dataclasses.replace(BINDING, payload_sha256=sha256_hex(b"trained again"))
    remember_sent(_site(receipts), BINDING)

    _deliver(receipts, again)

    assert json.loads(receipt_path(receipts, again).read_text())["binding"]["payload_sha256"] == (
        again.payload_sha256
    )
    assert len(json.loads(sent_path(receipts, BINDING).read_text())) == 2
