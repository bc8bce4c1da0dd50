"""Hostile payloads at every secure-aggregation and HE stage reject their site, not the round.

A site signs (with its own enrolled key) a payload built to break the server's parsing: JSON
nested 5,000 deep, an integer of 5,000 digits, ciphertexts in reversed order. The server-side
stages and the real ClientApp handlers run over the in-process grid; the other sites' sum comes
out, and the rejection is ledgered under the site's name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Message

from fedsilo.crypto import sha256_hex, sign_update
from fedsilo.ledger import EntryKind, read_entries
from fedsilo.model.flatten import flatten
from fedsilo.privacy.he import ckks
from fedsilo.protocol.he_records import ENCRYPTED_MESSAGE
from fedsilo.protocol.records import (
    SITE_KEY,
    UPDATE_KEY,
    binding_from_record,
    binding_to_record,
    payload_from_record,
    payload_to_record,
)
from fedsilo.protocol.secagg_records import (
    ADVERTISE_MESSAGE,
    SHARE_MESSAGE,
    UNMASK_MESSAGE,
)
from fedsilo.server.he_round import collect_he_round

from . import secagg_harness
from .secagg_harness import Harness, make_harness

DEEP_JSON = b'{"mask_public":' + b"[" * 5000 + b"]" * 5000 + b"}"
HUGE_INT_JSON = b'{"x":' + b"9" * 5000 + b"}"


def _resign(h: Harness, reply: Message, payload: bytes) -> None:
    """What a malicious enrolled site does: sign its own bad payload with its own key."""
    binding, _ = binding_from_record(reply.content.config_records[SITE_KEY])
    binding = replace(binding, payload_sha256=sha256_hex(payload))
    key = h.sites.sites[h.names.index(binding.site_id)].signing_key
    reply.content.array_records[UPDATE_KEY] = payload_to_record(payload)
    reply.content.config_records[SITE_KEY] = binding_to_record(binding, sign_update(key, binding))


def tamper_replies(
    h: Harness,
    monkeypatch: pytest.MonkeyPatch,
    *,
    site: str,
    message_type: str,
    payload: Callable[[bytes], bytes],
) -> None:
    """``site``'s replies to ``message_type`` carry ``payload(honest payload)``, re-signed."""
    pull = h.grid.pull_messages
    node = h.node(site)

    def tampered(message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(pull(message_ids))
        for reply in replies:
            ours = reply.metadata.src_node_id == node and not reply.has_error()
            if ours and reply.metadata.message_type == message_type:
                record = reply.content.array_records[UPDATE_KEY]
                honest = payload_from_record(record, max_bytes=1 << 30, what="")
                _resign(h, reply, payload(honest))
        return replies

    monkeypatch.setattr(h.grid, "pull_messages", tampered)


def _rejections(h: Harness) -> dict[str, str]:
    return {
        str(entry.payload["sender"]): str(entry.payload["reason"])
        for entry in read_entries(h.plan.ledger.path)
        if entry.kind is EntryKind.UPDATE_REJECTED
    }


@pytest.mark.parametrize(
    ("message_type", "payload", "reason"),
    [
        (ADVERTISE_MESSAGE, DEEP_JSON, "nested too deeply"),
        (ADVERTISE_MESSAGE, HUGE_INT_JSON, "an integer of 5000 digits"),
        (SHARE_MESSAGE, HUGE_INT_JSON, "an integer of 5000 digits"),
        (UNMASK_MESSAGE, DEEP_JSON, "nested too deeply"),
    ],
    ids=["advert nested", "advert huge int", "shares huge int", "unmask nested"],
)
def test_hostile_secagg_payload_rejects_its_site_and_the_sum_completes(
    message_type: str,
    payload: bytes,
    reason: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h = make_harness(tmp_path, monkeypatch, num_sites=4, threshold=3)
    tamper_replies(
        h, monkeypatch, site="site-0", message_type=message_type, payload=lambda _: payload
    )

    state, replies = h.run()

    assert state.total is not None, replies.failures
    # A site whose unmasking shares are refused still sent its masked input: it is summed.
    summed = h.names if message_type == UNMASK_MESSAGE else h.names[1:]
    np.testing.assert_array_equal(state.total, h.expected_sum(summed))
    rejections = _rejections(h)
    assert list(rejections) == ["site-0"]
    assert reason in rejections["site-0"]
    assert "\n" not in rejections["site-0"]


BIG_TEMPLATE = {"a.lora_A": torch.zeros(30, 50), "a.lora_B": torch.zeros(40, 30)}  # 2 ciphertexts


def _reversed_ciphertexts(payload: bytes) -> bytes:
    plain, *chunks = ckks.unframe(payload, what="test")
    assert len(chunks) == 2
    return ckks.frame([plain, *chunks[::-1]])


def _other_scale(payload: bytes) -> bytes:
    """The site's values encrypted under its own context at scale 2^30 (the round's is 2^40)."""
    plain, *_ = ckks.unframe(payload, what="test")
    own = ckks.load_context(ckks.new_secret_context(4096), what="own", secret=True)
    own.global_scale = 2.0**30
    return ckks.frame([plain, *ckks.encrypt(own, np.zeros(2700))])


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (_reversed_ciphertexts, "ciphertext 0 holds 652 values, expected 2048"),
        (_other_scale, "ciphertext 0 cannot be added (ValueError: scale mismatch)"),
    ],
    ids=["reversed order", "another scale"],
)
def test_he_site_sending_unaddable_ciphertexts_is_rejected_alone(
    payload: Callable[[bytes], bytes], reason: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(secagg_harness, "TEMPLATE", BIG_TEMPLATE)
    secure = {"mode": "he", "he_poly_modulus_degree": 4096}
    h = make_harness(tmp_path, monkeypatch, num_sites=4, threshold=3, secure=secure)
    tamper_replies(h, monkeypatch, site="site-1", message_type=ENCRYPTED_MESSAGE, payload=payload)

    replies = collect_he_round(
        h.grid, h.plan, BIG_TEMPLATE, round_number=1, attempt=1, nodes=h.nodes
    )

    honest = ["site-0", "site-2", "site-3"]
    assert replies.contributors == honest, replies.failures
    expected = np.mean([flatten(h.sites.deltas[n]) for n in honest], axis=0)
    np.testing.assert_allclose(flatten(replies.updates.mean()), expected, rtol=0, atol=1e-4)
    rejections = _rejections(h)
    assert list(rejections) == ["site-1"]
    assert reason in rejections["site-1"]


def test_an_unanticipated_decoding_failure_rejects_only_that_site(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedsilo.server import secagg_round

    decode = secagg_round.decode_sealed_map

    def fails_for_site_0(payload: bytes, *, site: str, recipients: set[str]) -> dict[str, bytes]:
        if site == "site-0":
            raise MemoryError("cannot allocate")
        return decode(payload, site=site, recipients=recipients)

    h = make_harness(tmp_path, monkeypatch, num_sites=4, threshold=3)
    monkeypatch.setattr(secagg_round, "decode_sealed_map", fails_for_site_0)

    state, replies = h.run()

    assert state.total is not None, replies.failures
    np.testing.assert_array_equal(state.total, h.expected_sum(h.names[1:]))
    assert _rejections(h) == {
        "site-0": "the secagg-share payload of site-0 could not be processed: "
        "MemoryError: cannot allocate"
    }


def test_an_unanticipated_failure_in_a_stage_halts_the_attempt_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedsilo.server import secagg_round

    def broken(**kwargs: object) -> np.ndarray:
        raise MemoryError("cannot allocate")

    h = make_harness(tmp_path, monkeypatch, num_sites=3)
    monkeypatch.setattr(secagg_round, "recover_sum", broken)

    state, replies = h.run()

    assert state.total is None
    reason = "secure aggregation stage unmask could not be processed: MemoryError: cannot allocate"
    assert replies.failures == {"secure-aggregation": reason}
    [halted] = [
        entry.payload
        for entry in read_entries(h.plan.ledger.path)
        if entry.kind is EntryKind.SECURE_AGGREGATION_STAGE and entry.payload["outcome"] == "halted"
    ]
    assert halted["stage"] == "unmask" and halted["reason"] == reason
