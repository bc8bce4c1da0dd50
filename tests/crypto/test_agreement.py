"""X25519 agreement (RFC 7748 vectors), AES-CTR mask expansion and AES-GCM sealing."""

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedsilo.crypto import (
    SealError,
    agree,
    agreement_key_from_bytes,
    agreement_private_bytes,
    agreement_public_bytes,
    expand_mask,
    generate_agreement_key,
    open_sealed,
    seal,
)

# RFC 7748, section 6.1.
ALICE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PUBLIC = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
BOB = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
BOB_PUBLIC = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
SHARED = bytes.fromhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")


def test_rfc7748_public_keys_and_shared_secret() -> None:
    alice, bob = agreement_key_from_bytes(ALICE), agreement_key_from_bytes(BOB)

    assert agreement_public_bytes(alice) == ALICE_PUBLIC
    assert agreement_public_bytes(bob) == BOB_PUBLIC
    assert alice.exchange(bob.public_key()) == SHARED


def test_both_ends_derive_the_same_key_and_context_separates() -> None:
    alice, bob = agreement_key_from_bytes(ALICE), agreement_key_from_bytes(BOB)

    ab = agree(alice, BOB_PUBLIC, context=b"round 1")
    ba = agree(bob, ALICE_PUBLIC, context=b"round 1")

    assert ab == ba and len(ab) == 32
    assert agree(alice, BOB_PUBLIC, context=b"round 2") != ab
    assert ab != SHARED  # the raw DH output is never used as a key


def test_private_bytes_round_trip() -> None:
    key = generate_agreement_key()

    again = agreement_key_from_bytes(agreement_private_bytes(key))

    assert agreement_public_bytes(again) == agreement_public_bytes(key)


def test_mask_is_the_aes_ctr_keystream() -> None:
    key = bytes(range(32))
    # Reference: AES-256 of the counter blocks 0, 1, 2, ... (big-endian 128-bit counters).
    blocks = b"".join(i.to_bytes(16, "big") for i in range(4))
    encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    reference = np.frombuffer(encryptor.update(blocks) + encryptor.finalize(), dtype="<u4")

    mask = expand_mask(key, 16)

    assert mask.dtype == np.uint32
    np.testing.assert_array_equal(mask, reference)
    np.testing.assert_array_equal(expand_mask(key, 5), reference[:5])


def test_masks_of_different_keys_differ() -> None:
    assert not np.array_equal(expand_mask(bytes(32), 8), expand_mask(bytes(31) + b"\x01", 8))


def test_seal_round_trip_and_tamper_detection() -> None:
    key = bytes(32)
    sealed = seal(key, b"share", associated=b"a->b")

    assert open_sealed(key, sealed, associated=b"a->b") == b"share"
    with pytest.raises(SealError):
        open_sealed(key, sealed, associated=b"a->c")
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(SealError):
        open_sealed(key, tampered, associated=b"a->b")
    with pytest.raises(SealError):
        open_sealed(bytes(31) + b"\x01", sealed, associated=b"a->b")
