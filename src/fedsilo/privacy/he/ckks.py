"""CKKS with TenSEAL: contexts, chunked encryption of a flat vector, ciphertext sums, decryption.

A vector is encrypted in chunks of ``poly_modulus_degree / 2`` values (one CKKS ciphertext
each), so every operation fits one ciphertext and TenSEAL never splits a vector behind our back.
Contexts and ciphertexts travel as TenSEAL's protobuf serialization (bytes, never pickle); a
public context (no secret key) can encrypt and add, not decrypt.

Parameters: we only ever add ciphertexts, which needs no multiplicative depth, so one data
modulus and the special prime suffice: [60, 60] bits for degrees 8192 and 16384, [60, 49] for
4096 (109 bits, the most the HE security standard allows at 128-bit security for 4096; 8192
allows 218 and 16384 allows 438), scale 2^40. That keeps a ciphertext at 32 bytes per value
(8 times the fp32 value) and the decryption error of a sum of a few ciphertexts near 1e-8
(``tests/privacy/he``).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import tenseal as ts

_PARAMETERS: dict[int, tuple[list[int], float]] = {
    4096: ([60, 49], 2.0**40),
    8192: ([60, 60], 2.0**40),
    16384: ([60, 60], 2.0**40),
}


class HeError(ValueError):
    """A context or ciphertext that cannot be used; names what it is."""


def new_secret_context(poly_modulus_degree: int) -> bytes:
    """A fresh CKKS context with its secret key, serialized (the key ceremony's secret)."""
    if poly_modulus_degree not in _PARAMETERS:
        raise HeError(f"poly_modulus_degree must be one of {sorted(_PARAMETERS)}")
    moduli, scale = _PARAMETERS[poly_modulus_degree]
    context = ts.context(
        ts.SCHEME_TYPE.CKKS, poly_modulus_degree=poly_modulus_degree, coeff_mod_bit_sizes=moduli
    )
    context.global_scale = scale
    return bytes(
        context.serialize(save_secret_key=True, save_galois_keys=False, save_relin_keys=False)
    )


def public_part(secret_context: bytes) -> bytes:
    """The same context without its secret key: what the server gets, to add ciphertexts."""
    context = load_context(secret_context, what="secret context")
    context.make_context_public()
    return bytes(context.serialize(save_galois_keys=False, save_relin_keys=False))


def load_context(raw: bytes, *, what: str, secret: bool | None = None) -> Any:
    """A TenSEAL context from bytes; ``secret`` True/False demands it holds / lacks the key."""
    try:
        context = ts.context_from(raw)
    except Exception as error:  # TenSEAL raises bare exceptions on bad protobuf
        raise HeError(f"{what}: not a TenSEAL context ({type(error).__name__})") from None
    if secret is not None and bool(context.has_secret_key()) != secret:
        state = "lacks" if secret else "holds"
        raise HeError(f"{what}: the context {state} a secret key")
    return context


def check_public_context(raw: bytes, *, poly_modulus_degree: int, what: str) -> Any:
    """The dealer's public context, loaded and held to the round's parameters.

    A dealer chooses the context every site encrypts under: one of another scheme, degree,
    modulus chain or scale would make every honest site's upload look wrong (rejecting the
    honest sites by name) or fail outside any one site's check; one carrying evaluation keys
    is more than the coordinator needs. So the context must be CKKS at the degree the round
    asked for, with the moduli and scale :func:`new_secret_context` makes, without the secret
    key or Galois and relinearization keys, and must encrypt.
    """
    context = load_context(raw, what=what, secret=False)
    if poly_modulus_degree not in _PARAMETERS:
        raise HeError(f"poly_modulus_degree must be one of {sorted(_PARAMETERS)}")
    moduli, scale = _PARAMETERS[poly_modulus_degree]
    try:
        data = context.seal_context().data.key_context_data()
        parms = data.parms()
        found = (
            str(parms.scheme()),
            int(parms.poly_modulus_degree()),
            int(data.total_coeff_modulus_bit_count()),
            float(context.global_scale),
        )
        keys = bool(context.has_galois_keys()) or bool(context.has_relin_keys())
    except Exception as error:  # TenSEAL raises bare exceptions for contexts of other schemes
        raise HeError(f"{what}: its parameters cannot be read ({type(error).__name__})") from None
    wanted = (str(ts.SCHEME_TYPE.CKKS), poly_modulus_degree, sum(moduli), scale)
    if found != wanted:
        raise HeError(
            f"{what}: scheme, degree, modulus bits and scale are {found}; the round asked for "
            f"{wanted}"
        )
    if keys:
        raise HeError(f"{what}: carries Galois or relinearization keys")
    try:
        ts.ckks_vector(context, [0.0])
    except Exception as error:
        raise HeError(f"{what}: does not encrypt ({type(error).__name__})") from None
    return context


def slots(context: Any) -> int:
    """Values per ciphertext."""
    parms = context.seal_context().data.key_context_data().parms()
    return int(parms.poly_modulus_degree()) // 2


def encrypt(context: Any, vector: np.ndarray) -> list[bytes]:
    """``vector`` as serialized ciphertexts of at most :func:`slots` values each."""
    size = slots(context)
    values = np.asarray(vector, dtype=np.float64)
    return [
        bytes(ts.ckks_vector(context, values[i : i + size].tolist()).serialize())
        for i in range(0, len(values), size)
    ]


def _ciphertexts(context: Any, chunks: Sequence[bytes], what: str) -> list[Any]:
    out = []
    for index, chunk in enumerate(chunks):
        try:
            out.append(ts.ckks_vector_from(context, chunk))
        except Exception as error:
            raise HeError(
                f"{what}: ciphertext {index} does not parse ({type(error).__name__})"
            ) from None
    return out


def chunk_sizes(context: Any, length: int) -> list[int]:
    """Values in each ciphertext of an encrypted vector of ``length`` values."""
    size = slots(context)
    return [min(size, length - start) for start in range(0, length, size)]


def encrypted_zeros(context: Any, length: int) -> list[Any]:
    """Ciphertexts of ``length`` zeros under ``context`` (public is enough): the reference
    :func:`check_vector` adds each upload to, as the sum will."""
    return [ts.ckks_vector(context, [0.0] * size) for size in chunk_sizes(context, length)]


def check_vector(
    context: Any, chunks: Sequence[bytes], *, reference: Sequence[Any], what: str
) -> None:
    """Raise HeError unless ``chunks`` parse under ``context`` in ``reference``'s layout (the
    same number of ciphertexts, each of the same size) and each adds to its reference chunk.

    Run on each site's upload before it is summed, so that one site's ciphertexts in another
    order, of other sizes, scales or parameters are that site's rejection, not a failed sum.
    """
    if len(chunks) != len(reference):
        raise HeError(f"{what}: {len(chunks)} ciphertexts, expected {len(reference)}")
    vectors = _ciphertexts(context, chunks, what)
    for index, (vector, expected) in enumerate(zip(vectors, reference, strict=True)):
        if vector.size() != expected.size():
            raise HeError(
                f"{what}: ciphertext {index} holds {vector.size()} values, "
                f"expected {expected.size()}"
            )
        try:
            expected + vector
        except Exception as error:  # TenSEAL raises ValueError or RuntimeError
            raise HeError(
                f"{what}: ciphertext {index} cannot be added ({type(error).__name__}: {error})"
            ) from None


def add_all(context: Any, contributions: Sequence[Sequence[bytes]], *, what: str) -> list[bytes]:
    """The chunk-wise homomorphic sum of several encrypted vectors of equal layout."""
    if not contributions:
        raise HeError(f"{what}: nothing to add")
    total = _ciphertexts(context, contributions[0], what)
    for number, other in enumerate(contributions[1:], start=1):
        if len(other) != len(total):
            raise HeError(f"{what}: {len(other)} ciphertexts, expected {len(total)}")
        for index, ciphertext in enumerate(_ciphertexts(context, other, what)):
            try:
                total[index] = total[index] + ciphertext
            except Exception as error:  # TenSEAL raises ValueError or RuntimeError
                raise HeError(
                    f"{what}: ciphertext {index} of contribution {number} cannot be added "
                    f"({type(error).__name__}: {error})"
                ) from None
    return [bytes(c.serialize()) for c in total]


def decrypt(context: Any, chunks: Sequence[bytes], *, length: int, what: str) -> np.ndarray:
    """The float64 vector of ``length`` values behind ``chunks`` (needs the secret key)."""
    values: list[float] = []
    for ciphertext in _ciphertexts(context, chunks, what):
        values.extend(ciphertext.decrypt())
    if len(values) != length:
        raise HeError(f"{what}: decrypted {len(values)} values, expected {length}")
    return np.asarray(values, dtype=np.float64)


def frame(parts: Sequence[bytes]) -> bytes:
    """Parts as one byte string: a uint32 count, then each part as uint64 length + bytes."""
    out = [struct.pack("<I", len(parts))]
    for part in parts:
        out += [struct.pack("<Q", len(part)), part]
    return b"".join(out)


def unframe(data: bytes, *, what: str) -> list[bytes]:
    """The inverse of :func:`frame`; refuses truncated or trailing bytes."""
    if len(data) < 4:
        raise HeError(f"{what}: too short to be framed")
    (count,) = struct.unpack_from("<I", data, 0)
    offset, parts = 4, []
    for _ in range(count):
        if offset + 8 > len(data):
            raise HeError(f"{what}: truncated")
        (size,) = struct.unpack_from("<Q", data, offset)
        offset += 8
        if offset + size > len(data):
            raise HeError(f"{what}: truncated")
        parts.append(data[offset : offset + size])
        offset += size
    if offset != len(data):
        raise HeError(f"{what}: {len(data) - offset} trailing bytes")
    return parts
