"""The coordinator's receipts, as a site keeps them, and the record of what the site sent.

A receipt is the site's evidence against a ledger rewritten later. The site keeps one only for
an update it signed and sent: every payload it signs is recorded first (:func:`remember_sent`),
and a receipt whose binding is not among them is refused.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from fedsilo.crypto import Receipt, UpdateBinding, encode_signature, verify_receipt
from fedsilo.protocol.records import RUN_ID_PATTERN, STAGE_PATTERN
from fedsilo.storage import read_json_value, write_text_atomic

if TYPE_CHECKING:
    from fedsilo.client.site import Site


def keep_receipt(site: Site, receipt: Receipt, signature: bytes) -> Path:
    """Verify ``receipt`` as issued to ``site`` by its coordinator and store it; return where.

    Receipts are the site's evidence against a ledger rewritten later: one is never replaced
    by another (the same receipt delivered twice is kept once), and one is kept only for an
    update this site sent (:func:`remember_sent`): the same run, round, stage and payload
    digest. A receipt for anything else would be evidence of what the site never released."""
    if receipt.binding.site_id != site.name:
        raise ValueError(
            f"site {site.name}: refusing a receipt issued to {receipt.binding.site_id!r}"
        )
    verify_receipt(site.coordinator_key, receipt, signature)
    path = receipt_path(site.receipts_dir, receipt.binding)
    sent = _sent_bindings(sent_path(site.receipts_dir, receipt.binding))
    if receipt.binding.fields() not in sent:
        digests = ", ".join(str(b["payload_sha256"])[:16] for b in sent) or "none"
        raise ValueError(
            f"site {site.name}: refusing a receipt for run {receipt.binding.run_id} round "
            f"{receipt.binding.round} stage {receipt.binding.stage}: this site sent no such "
            f"update (receipt's payload sha256 {receipt.binding.payload_sha256[:16]}, "
            f"federation {receipt.binding.federation_id!r}; sent: {digests})"
        )
    record = {**asdict(receipt), "signature": encode_signature(signature)}
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    if path.exists() and path.read_text(encoding="utf-8") != text:
        raise ValueError(f"site {site.name}: {path} already holds another receipt; kept it")
    write_text_atomic(path, text)
    return path


def remember_sent(site: Site, binding: UpdateBinding) -> None:
    """Record that ``site`` sends the update ``binding`` names, before it is sent, so that a
    receipt can be matched to it (a round asked again adds its new update beside the old)."""
    path = sent_path(site.receipts_dir, binding)
    sent = _sent_bindings(path)
    if binding.fields() not in sent:
        text = json.dumps([*sent, binding.fields()], indent=2, sort_keys=True) + "\n"
        write_text_atomic(path, text)


def _sent_bindings(path: Path) -> list[dict[str, str | int]]:
    if not path.exists():
        return []
    try:
        loaded = read_json_value(path)
    except ValueError as error:
        raise ValueError(f"{path}: not a JSON list of sent update bindings ({error})") from None
    if not isinstance(loaded, list) or not all(isinstance(b, dict) for b in loaded):
        raise ValueError(f"{path}: not a list of sent update bindings")
    return loaded


def sent_path(receipts_dir: Path, binding: UpdateBinding) -> Path:
    """Where a site records the updates it sent for ``binding``'s run, round and stage: beside
    its receipts folder (which holds only receipts), named as the receipt will be."""
    receipt = receipt_path(receipts_dir, binding)
    return receipts_dir.parent / "sent-updates" / binding.run_id / receipt.name


def receipt_path(receipts_dir: Path, binding: UpdateBinding) -> Path:
    """Where a site keeps the receipt for ``binding``: one folder per run (a deployed site's
    storage outlives its runs), one file per round and stage. The coordinator chose the run
    id and stage, so both must be plain names; anything else is refused, naming the field."""
    if not RUN_ID_PATTERN.fullmatch(binding.run_id):
        raise ValueError(f"receipt: run_id {binding.run_id[:80]!r} is not a plain name")
    if not STAGE_PATTERN.fullmatch(binding.stage):
        raise ValueError(f"receipt: stage {binding.stage[:80]!r} is not a plain name")
    if binding.round < 0:
        raise ValueError(f"receipt: round {binding.round} is negative")
    return receipts_dir / binding.run_id / f"round-{binding.round}-{binding.stage}.json"
