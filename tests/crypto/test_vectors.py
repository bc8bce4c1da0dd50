"""Known-answer vectors from independent sources (RFC 8032, RFC 8037, FIPS 180-2).

The fedsilo-specific answers were computed with the RFC 8032 section 6 reference code (pure
Python, independent of OpenSSL) and with coreutils/openssl on the literal bytes shown here.
"""

from __future__ import annotations

import pytest

from fedsilo.crypto import (
    UpdateBinding,
    canonical_bytes,
    fingerprint,
    private_key_from_seed,
    public_key_text,
    sha256_hex,
    sign_update,
    verify_update,
)

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
