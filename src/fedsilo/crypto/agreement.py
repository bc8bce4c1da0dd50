"""Key agreement, mask expansion and authenticated encryption for secure aggregation.

Three recipes, each on one primitive of ``cryptography``:

- :func:`agree`: X25519 Diffie-Hellman, then HKDF-SHA256 with a caller-given ``context``
  (federation, run, round, attempt and the two site names), so a shared key is never reused
  across rounds, attempts or pairs.
- :func:`expand_mask`: a 32-byte key as an AES-256-CTR keystream (zero nonce), read as
  little-endian uint32 words. A key must feed exactly one stream; every key given here is
  either freshly random (self-mask seeds) or derived with a unique context (pairwise masks).
- :func:`seal` / :func:`open_sealed`: AES-256-GCM with a random 96-bit nonce prefixed to the
  ciphertext and caller-given associated data (who sends what to whom, in which round).
"""

from __future__ import annotations

import os
from typing import TypeAlias

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

AgreementKey: TypeAlias = X25519PrivateKey

KEY_BYTES = 32
NONCE_BYTES = 12
_ZERO_NONCE = bytes(16)
_RAW = serialization.Encoding.Raw


class SealError(ValueError):
    """A sealed message that does not open: wrong key, wrong associated data, or tampered."""


def generate_agreement_key() -> AgreementKey:
    """A fresh X25519 private key from the operating system's secure random source."""
    return X25519PrivateKey.generate()


def agreement_public_bytes(key: AgreementKey) -> bytes:
    """The 32 raw bytes of ``key``'s public half, as advertised to peers."""
    return key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)


def agreement_private_bytes(key: AgreementKey) -> bytes:
    """The 32 raw bytes of ``key`` (what is secret-shared so peers can recover a dropout)."""
    return key.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def agreement_key_from_bytes(raw: bytes) -> AgreementKey:
    """The X25519 private key with these 32 raw bytes."""
    if len(raw) != KEY_BYTES:
        raise ValueError(f"an X25519 private key is {KEY_BYTES} bytes, got {len(raw)}")
    return X25519PrivateKey.from_private_bytes(raw)


def agree(private: AgreementKey, peer_public: bytes, *, context: bytes) -> bytes:
    """The 32-byte key both ends derive: HKDF-SHA256(X25519(private, peer), info=context)."""
    if len(peer_public) != KEY_BYTES:
        raise ValueError(f"an X25519 public key is {KEY_BYTES} bytes, got {len(peer_public)}")
    secret = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=context).derive(secret)


def expand_mask(key: bytes, count: int) -> np.ndarray:
    """``count`` pseudo-random uint32 words: the AES-256-CTR keystream of ``key``."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"a mask key is {KEY_BYTES} bytes, got {len(key)}")
    if count < 0:
        raise ValueError(f"mask length must be >= 0, got {count}")
    encryptor = Cipher(algorithms.AES(key), modes.CTR(_ZERO_NONCE)).encryptor()
    stream = encryptor.update(bytes(4 * count)) + encryptor.finalize()
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32, copy=False)


def seal(key: bytes, plaintext: bytes, *, associated: bytes) -> bytes:
    """AES-256-GCM encryption: nonce || ciphertext || tag."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, sealed: bytes, *, associated: bytes) -> bytes:
    """The plaintext of :func:`seal`'s output; raises :class:`SealError` if it does not verify."""
    if len(sealed) < NONCE_BYTES + 16:
        raise SealError(f"sealed message of {len(sealed)} bytes is too short")
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated)
    except InvalidTag:
        raise SealError("sealed message does not verify (wrong key, context or tampered)") from None
