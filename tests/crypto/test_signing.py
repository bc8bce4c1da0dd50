from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsilo.crypto import (
    DOMAIN,
    Receipt,
    SignatureError,
    UpdateBinding,
    canonical_bytes,
    claims_sha256,
    decode_signature,
    encode_signature,
    private_key_from_seed,
    sha256_hex,
    sign,
    sign_claims,
    sign_receipt,
    sign_update,
    verify,
    verify_claims,
    verify_receipt,
    verify_update,
)

SITE_KEY = private_key_from_seed(bytes(range(32)))
OTHER_KEY = private_key_from_seed(bytes(range(1, 33)))

BINDING = UpdateBinding(
    federation_id="fed-1",
    run_id="run-7",
    round=3,
    stage="train",
    site_id="st-mary",
    payload_sha256=sha256_hex(b"adapter delta"),
)
RECEIPT = Receipt(binding=BINDING, ledger_seq=12, entry_hash=sha256_hex(b"ledger entry 12"))

CHANGED_BINDING_FIELDS = {
    "federation_id": "fed-2",
    "run_id": "run-8",
    "round": 4,
    "stage": "eval",
    "site_id": "county-general",
    "payload_sha256": sha256_hex(b"another delta"),
}


def test_sign_returns_64_bytes() -> None:
    assert len(sign(SITE_KEY, "update", {"a": 1})) == 64


def test_update_signature_verifies() -> None:
    signature = sign_update(SITE_KEY, BINDING)

    verify_update(SITE_KEY.public_key(), BINDING, signature)


def test_flipped_signature_bit_is_rejected() -> None:
    signature = bytearray(sign_update(SITE_KEY, BINDING))
    signature[10] ^= 0x01

    with pytest.raises(SignatureError, match="signature does not match"):
        verify_update(SITE_KEY.public_key(), BINDING, bytes(signature))


def test_binding_fields_cover_every_attribute() -> None:
    names = {field.name for field in dataclasses.fields(UpdateBinding)}

    assert set(BINDING.fields()) == names == set(CHANGED_BINDING_FIELDS)


@pytest.mark.parametrize(("name", "value"), sorted(CHANGED_BINDING_FIELDS.items()))
def test_changed_binding_field_is_rejected(name: str, value: str | int) -> None:
    signature = sign_update(SITE_KEY, BINDING)
    changes: dict[str, Any] = {name: value}
    changed = dataclasses.replace(BINDING, **changes)

    with pytest.raises(SignatureError, match="signature does not match"):
        verify_update(SITE_KEY.public_key(), changed, signature)


def test_signature_from_another_key_is_rejected() -> None:
    signature = sign_update(OTHER_KEY, BINDING)

    with pytest.raises(SignatureError, match="signature does not match"):
        verify_update(SITE_KEY.public_key(), BINDING, signature)


@pytest.mark.parametrize("length", [0, 32, 63, 65])
def test_wrong_length_signature_is_rejected(length: int) -> None:
    signature = (sign_update(SITE_KEY, BINDING) * 2)[:length]

    with pytest.raises(SignatureError, match="signature does not match"):
        verify_update(SITE_KEY.public_key(), BINDING, signature)


def test_update_signature_does_not_verify_for_another_purpose() -> None:
    signature = sign_update(SITE_KEY, BINDING)

    with pytest.raises(SignatureError, match="signature does not match"):
        verify(SITE_KEY.public_key(), "receipt", BINDING.fields(), signature)


def test_update_signature_is_not_a_receipt_signature() -> None:
    # A receipt over the same binding with the same key must not be forgeable from it.
    signature = sign_update(SITE_KEY, BINDING)

    with pytest.raises(SignatureError, match="signature does not match"):
        verify_receipt(SITE_KEY.public_key(), RECEIPT, signature)


CLAIMS = claims_sha256(metrics={"num_examples": 8}, dp_event=None)


def test_claims_signature_verifies_only_for_its_digest_and_binding() -> None:
    signature = sign_claims(SITE_KEY, BINDING, CLAIMS)
    other_claims = claims_sha256(metrics={"num_examples": 9}, dp_event=None)
    other_round = dataclasses.replace(BINDING, round=4)

    verify_claims(SITE_KEY.public_key(), BINDING, CLAIMS, signature)
    with pytest.raises(SignatureError):
        verify_claims(SITE_KEY.public_key(), BINDING, other_claims, signature)
    with pytest.raises(SignatureError):
        verify_claims(SITE_KEY.public_key(), other_round, CLAIMS, signature)


def test_update_signature_is_not_a_claims_signature() -> None:
    # The claims carry the binding's fields plus one: no other signature may stand for them.
    fields = {**BINDING.fields(), "claims_sha256": CLAIMS}
    signature = sign(SITE_KEY, "update", fields)

    with pytest.raises(SignatureError, match="signature does not match"):
        verify_claims(SITE_KEY.public_key(), BINDING, CLAIMS, signature)


def test_receipt_signature_verifies() -> None:
    signature = sign_receipt(SITE_KEY, RECEIPT)

    verify_receipt(SITE_KEY.public_key(), RECEIPT, signature)


def test_receipt_fields_are_binding_plus_ledger_position() -> None:
    assert RECEIPT.fields() == {
        **BINDING.fields(),
        "ledger_seq": 12,
        "entry_hash": sha256_hex(b"ledger entry 12"),
    }


@pytest.mark.parametrize(
    "changed",
    [
        dataclasses.replace(RECEIPT, ledger_seq=13),
        dataclasses.replace(RECEIPT, entry_hash=sha256_hex(b"other entry")),
        dataclasses.replace(RECEIPT, binding=dataclasses.replace(BINDING, round=4)),
    ],
    ids=["ledger_seq", "entry_hash", "binding"],
)
def test_changed_receipt_is_rejected(changed: Receipt) -> None:
    signature = sign_receipt(SITE_KEY, RECEIPT)

    with pytest.raises(SignatureError, match="signature does not match"):
        verify_receipt(SITE_KEY.public_key(), changed, signature)


def test_canonical_bytes_ignore_field_order() -> None:
    assert canonical_bytes("update", {"a": 1, "b": "x"}) == canonical_bytes(
        "update", {"b": "x", "a": 1}
    )


def test_canonical_bytes_tell_int_from_digit_string() -> None:
    assert canonical_bytes("update", {"round": 3}) != canonical_bytes("update", {"round": "3"})


@pytest.mark.parametrize("value", [True, 1.0, None, b"bytes", ["list"]], ids=repr)
def test_canonical_bytes_refuse_other_value_types(value: object) -> None:
    with pytest.raises(TypeError, match="'round'"):
        canonical_bytes("update", {"round": value})  # type: ignore[dict-item]


def test_canonical_bytes_refuse_non_string_field_names() -> None:
    with pytest.raises(TypeError, match="field name 1"):
        canonical_bytes("update", {1: "x"})  # type: ignore[dict-item]


@pytest.mark.parametrize("purpose", ["", "Update", "up date", "update\n", "upd\u00e4te", "a_b"])
def test_canonical_bytes_refuse_bad_purpose(purpose: str) -> None:
    with pytest.raises(ValueError, match="purpose"):
        canonical_bytes(purpose, {"a": 1})


def test_signature_text_round_trip() -> None:
    signature = sign_update(SITE_KEY, BINDING)

    assert decode_signature(encode_signature(signature)) == signature


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not base64!",
        encode_signature(bytes(63)),
        encode_signature(bytes(65)),
        encode_signature(bytes(64)).rstrip("="),
        encode_signature(bytes(64)) + "\n",
        encode_signature(bytes(64)).replace("A", "-", 1),
    ],
    ids=["empty", "garbage", "63-bytes", "65-bytes", "unpadded", "newline", "urlsafe-char"],
)
def test_decode_signature_refuses_garbage(text: str) -> None:
    with pytest.raises(SignatureError, match="signature text"):
        decode_signature(text)


_field_values = st.one_of(st.text(), st.integers())
_fields = st.dictionaries(st.text(max_size=12), _field_values, max_size=8)
_purposes = st.from_regex(r"[a-z0-9-]{1,16}", fullmatch=True)


@settings(deadline=None)
@given(purpose=_purposes, fields=_fields)
def test_sign_verify_round_trip(purpose: str, fields: dict[str, str | int]) -> None:
    signature = sign(SITE_KEY, purpose, fields)

    verify(SITE_KEY.public_key(), purpose, fields, signature)


@settings(deadline=None)
@given(purpose=_purposes, fields=_fields)
def test_canonical_bytes_decode_back_to_purpose_and_fields(
    purpose: str, fields: dict[str, str | int]
) -> None:
    # The encoding is unambiguous: the signed bytes determine the purpose and every field.
    encoded = canonical_bytes(purpose, fields)

    assert encoded.startswith(DOMAIN)
    decoded_purpose, newline, body = encoded[len(DOMAIN) :].partition(b"\n")
    assert newline == b"\n"
    assert decoded_purpose.decode("ascii") == purpose
    assert json.loads(body) == fields
