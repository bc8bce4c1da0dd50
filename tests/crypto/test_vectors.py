"""Known-answer vectors from independent sources (RFC 8032, RFC 8037, FIPS 180-2).

The fedsilo-specific answers were computed with the RFC 8032 section 6 reference code (pure
Python, independent of OpenSSL) and with coreutils/openssl on the literal bytes shown here.
"""

from __future__ import annotations

import hashlib

import pytest

from fedsilo.crypto import (
    CLAIMS_PURPOSE,
    UpdateBinding,
    canonical_bytes,
    claims_sha256,
    fingerprint,
    private_key_from_seed,
    public_key_text,
    sha256_hex,
    sign_claims,
    sign_update,
    verify_claims,
    verify_update,
)
from fedsilo.crypto.signing import claims_fields

# RFC 8032 section 7.1, Ed25519 TEST 1, TEST 2 and TEST 3: (secret key, public key, message,
# signature), hex as printed in the RFC.
RFC8032_VECTORS = [
    pytest.param(
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
        "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
        id="TEST-1",
    ),
    pytest.param(
        "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
        "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
        id="TEST-2",
    ),
    pytest.param(
        "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
        "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
        "af82",
        "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac"
        "18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
        id="TEST-3",
    ),
]

RFC8032_TEST1_SECRET = bytes.fromhex(
    "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"
)

# FIPS 180-2 appendix B.1: SHA-256("abc").
SHA256_ABC = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def raw_ed25519_sign(seed: bytes, message: bytes) -> bytes:
    """Plain Ed25519 over ``message``: no fedsilo domain prefix, no canonical encoding."""
    return private_key_from_seed(seed).sign(message)


@pytest.mark.parametrize(("secret", "public", "message", "signature"), RFC8032_VECTORS)
def test_seed_gives_rfc8032_public_key(
    secret: str, public: str, message: str, signature: str
) -> None:
    key = private_key_from_seed(bytes.fromhex(secret))

    assert key.public_key().public_bytes_raw().hex() == public


@pytest.mark.parametrize(("secret", "public", "message", "signature"), RFC8032_VECTORS)
def test_raw_signature_matches_rfc8032(
    secret: str, public: str, message: str, signature: str
) -> None:
    produced = raw_ed25519_sign(bytes.fromhex(secret), bytes.fromhex(message))

    assert produced.hex() == signature


def test_public_key_text_of_rfc8032_test1_key() -> None:
    # RFC 8037 appendix A.2 gives this key's x as base64url "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMl
    # rwIaaPcHURo"; the text form uses standard base64 with padding.
    key = private_key_from_seed(RFC8032_TEST1_SECRET).public_key()

    assert public_key_text(key) == "ed25519:11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="


def test_fingerprint_of_rfc8032_test1_key() -> None:
    # `xxd -r -p <<< d75a...511a | openssl dgst -sha256 -binary | base64`, padding dropped.
    key = private_key_from_seed(RFC8032_TEST1_SECRET).public_key()

    assert fingerprint(key) == "SHA256:If4x36FUomFia/hUBG/SJxt77UtqvkWqWId+9H+XIbk"


def test_sha256_hex_matches_fips180_vector() -> None:
    assert sha256_hex(b"abc") == SHA256_ABC


def test_canonical_bytes_known_answer() -> None:
    fields: dict[str, str | int] = {
        "zeta": -5,
        "b": 1,
        "a": 'quote " and backslash \\',
        "\u00e9": "\u00fc\U0001f600",
        "line": "x\ny",
    }

    encoded = canonical_bytes("receipt", fields)

    assert encoded == (
        b"fedsilo/v1\n"
        b"receipt\n"
        b'{"a":"quote \\" and backslash \\\\","b":1,"line":"x\\ny","zeta":-5,'
        b'"\\u00e9":"\\u00fc\\ud83d\\ude00"}'
    )


KAT_SEED = bytes(range(32))
KAT_BINDING = UpdateBinding(
    federation_id="fed-1",
    run_id="run-7",
    round=3,
    stage="train",
    site_id="st-mary",
    payload_sha256=SHA256_ABC,
)
# The recipe: b"fedsilo/v1\n" + purpose + b"\n" + the binding's fields as JSON with sorted keys
# and no whitespace. This literal is what every verifier must reconstruct byte for byte.
KAT_UPDATE_MESSAGE = (
    b'fedsilo/v1\nupdate\n{"federation_id":"fed-1","payload_sha256":'
    b'"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",'
    b'"round":3,"run_id":"run-7","site_id":"st-mary","stage":"train"}'
)
# Ed25519 of KAT_UPDATE_MESSAGE under KAT_SEED, from the RFC 8032 section 6 reference code.
KAT_UPDATE_SIGNATURE = bytes.fromhex(
    "e244a0413a2a377cf17e1464ca2624f2030ad0e002f9e3cfeb4902da1aba15c2"
    "f36c5bae6b2cd0c01e5160fbc99f95222733a9c6856797c65f3c896309b27a02"
)


def test_update_binding_canonical_bytes_known_answer() -> None:
    assert canonical_bytes("update", KAT_BINDING.fields()) == KAT_UPDATE_MESSAGE


def test_raw_signature_of_update_message_matches_reference_implementation() -> None:
    assert raw_ed25519_sign(KAT_SEED, KAT_UPDATE_MESSAGE) == KAT_UPDATE_SIGNATURE


def test_sign_update_known_answer() -> None:
    signature = sign_update(private_key_from_seed(KAT_SEED), KAT_BINDING)

    assert signature == raw_ed25519_sign(KAT_SEED, KAT_UPDATE_MESSAGE)
    assert signature == KAT_UPDATE_SIGNATURE


def test_verify_update_accepts_known_answer() -> None:
    public = private_key_from_seed(KAT_SEED).public_key()

    verify_update(public, KAT_BINDING, KAT_UPDATE_SIGNATURE)


# A site's claims: metrics as SiteMetrics.claim_fields writes them and a DP-SGD event as
# event_to_json writes it. KAT_CLAIMS_JSON is the recipe's text, written out by hand (keys
# sorted at every level, no whitespace, 1e-05 as Python writes that float); its digest is
# `printf '%s' '<the text>' | sha256sum` (coreutils) and `openssl dgst -sha256`.
KAT_METRICS: dict[str, object] = {
    "num_examples": 8,
    "train_loss": 2.5,
    "tokens": 300,
    "seconds": 1e-05,
    "precision": "fp32",
    "padding_share": 0.125,
}
KAT_DP_EVENT: dict[str, object] = {
    "type": "poisson_gaussian",
    "noise_multiplier": 1.5,
    "sampling_rate": 0.25,
    "steps": 2,
}
KAT_CLAIMS_JSON = (
    b'{"dp_event":{"noise_multiplier":1.5,"sampling_rate":0.25,"steps":2,'
    b'"type":"poisson_gaussian"},"metrics":{"num_examples":8,"padding_share":0.125,'
    b'"precision":"fp32","seconds":1e-05,"tokens":300,"train_loss":2.5}}'
)
KAT_CLAIMS_SHA256 = "fe16c2dcbc0ebb7ad28092b3f9215297d6f5a8149085ac285e56665e46a2e3a0"
# sha256sum of the 32 bytes {"dp_event":null,"metrics":null}: an update that claims nothing.
KAT_NO_CLAIMS_SHA256 = "564ce47ca9520042b2dcd5afd316195781d5b04fec07821bae08e62d2c86709a"
# The claims signature's message: the update binding's fields plus claims_sha256, purpose
# "update-claims", under the same b"fedsilo/v1\n" domain as every fedsilo signature.
KAT_CLAIMS_MESSAGE = (
    b'fedsilo/v1\nupdate-claims\n{"claims_sha256":'
    b'"fe16c2dcbc0ebb7ad28092b3f9215297d6f5a8149085ac285e56665e46a2e3a0",'
    b'"federation_id":"fed-1","payload_sha256":'
    b'"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",'
    b'"round":3,"run_id":"run-7","site_id":"st-mary","stage":"train"}'
)
# Ed25519 of KAT_CLAIMS_MESSAGE under KAT_SEED, from the RFC 8032 section 6 reference code
# (the same code reproduces RFC 8032 TEST 2 and KAT_UPDATE_SIGNATURE above).
KAT_CLAIMS_SIGNATURE = bytes.fromhex(
    "bc64a4eb66bc0628b41351a63896e264bbf31dcb3a7c3a39c423bcd8ae139783"
    "c67e3e76944353f211c7e49c45d668a3a782fa702c49e377f3439717e84adb04"
)


def test_claims_text_hashes_to_its_known_digest() -> None:
    assert hashlib.sha256(KAT_CLAIMS_JSON).hexdigest() == KAT_CLAIMS_SHA256


def test_claims_sha256_known_answer() -> None:
    assert claims_sha256(metrics=KAT_METRICS, dp_event=KAT_DP_EVENT) == KAT_CLAIMS_SHA256


def test_claims_sha256_of_no_claims_known_answer() -> None:
    assert hashlib.sha256(b'{"dp_event":null,"metrics":null}').hexdigest() == KAT_NO_CLAIMS_SHA256
    assert claims_sha256(metrics=None, dp_event=None) == KAT_NO_CLAIMS_SHA256


def test_claims_message_canonical_bytes_known_answer() -> None:
    fields = claims_fields(KAT_BINDING, KAT_CLAIMS_SHA256)

    assert canonical_bytes(CLAIMS_PURPOSE, fields) == KAT_CLAIMS_MESSAGE


def test_sign_claims_known_answer() -> None:
    signature = sign_claims(private_key_from_seed(KAT_SEED), KAT_BINDING, KAT_CLAIMS_SHA256)

    assert signature == raw_ed25519_sign(KAT_SEED, KAT_CLAIMS_MESSAGE)
    assert signature == KAT_CLAIMS_SIGNATURE


def test_verify_claims_accepts_known_answer() -> None:
    public = private_key_from_seed(KAT_SEED).public_key()

    verify_claims(public, KAT_BINDING, KAT_CLAIMS_SHA256, KAT_CLAIMS_SIGNATURE)
