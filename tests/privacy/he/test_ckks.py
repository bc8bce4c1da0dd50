"""CKKS through TenSEAL: sums of ciphertexts decrypt to the plaintext sum within CKKS error."""

import numpy as np
import pytest

from fedsilo.privacy.he import ckks


@pytest.fixture(scope="module")
def secret() -> bytes:
    return ckks.new_secret_context(8192)


def test_sum_of_ciphertexts_matches_the_plaintext_sum(secret: bytes) -> None:
    rng = np.random.default_rng(0)
    vectors = [rng.normal(0, 0.05, 9000) for _ in range(4)]
    key = ckks.load_context(secret, what="key", secret=True)
    public = ckks.load_context(ckks.public_part(secret), what="public", secret=False)

    encrypted = [ckks.encrypt(public, v) for v in vectors]
    total = ckks.add_all(public, encrypted, what="sum")
    decrypted = ckks.decrypt(key, total, length=9000, what="sum")

    assert len(encrypted[0]) == 3  # 4096 values per ciphertext
    # Scale 2^40: a fresh ciphertext decrypts within ~1e-9; a sum of 4 within a few times that.
    np.testing.assert_allclose(decrypted, np.sum(vectors, axis=0), rtol=0, atol=1e-6)


def test_the_public_context_cannot_decrypt(secret: bytes) -> None:
    public = ckks.load_context(ckks.public_part(secret), what="public", secret=False)
    chunks = ckks.encrypt(public, np.ones(5))

    with pytest.raises(ValueError, match="secret"):
        ckks.decrypt(public, chunks, length=5, what="sum")


def test_context_secrecy_is_checked(secret: bytes) -> None:
    with pytest.raises(ckks.HeError, match="holds a secret key"):
        ckks.load_context(secret, what="the server's context", secret=False)
    with pytest.raises(ckks.HeError, match="not a TenSEAL context"):
        ckks.load_context(b"garbage", what="context")


def test_mismatched_ciphertext_counts_are_refused(secret: bytes) -> None:
    public = ckks.load_context(ckks.public_part(secret), what="public", secret=False)

    with pytest.raises(ckks.HeError, match="1 ciphertexts, expected 2"):
        ckks.add_all(
            public,
            [ckks.encrypt(public, np.ones(5000)), ckks.encrypt(public, np.ones(5))],
            what="sum",
        )
    with pytest.raises(ckks.HeError, match="does not parse"):
        ckks.add_all(public, [[b"junk"]], what="sum")


def test_frames_round_trip_and_refuse_truncation() -> None:
    parts = [b"", b"abc", bytes(1000)]

    framed = ckks.frame(parts)

    assert ckks.unframe(framed, what="x") == parts
    with pytest.raises(ckks.HeError, match="truncated"):
        ckks.unframe(framed[:-1], what="x")
    with pytest.raises(ckks.HeError, match="trailing"):
        ckks.unframe(framed + b"!", what="x")
