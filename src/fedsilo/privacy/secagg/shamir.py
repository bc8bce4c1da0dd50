"""Shamir secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

A secret ``s`` (32 bytes, read big-endian as an integer below 2^256, so below the prime) is the
constant term of a random polynomial ``f`` of degree ``threshold - 1``; share ``i`` is
``(i, f(i))`` for ``i = 1..n``. Any ``threshold`` shares give back ``s`` by Lagrange
interpolation at 0; fewer reveal nothing about it (every value of ``s`` is equally likely given
``threshold - 1`` shares). Coefficients come from the operating system's secure random source.

P = 2^521 - 1 is a Mersenne prime (the NIST P-521 field), large enough for any 32-byte secret.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

PRIME = 2**521 - 1
SECRET_BYTES = 32
SHARE_BYTES = 66  # ceil(521 / 8)


class ShamirError(ValueError):
    """Shares that cannot reconstruct a secret (too few, duplicated, or out of range)."""


@dataclass(frozen=True)
class Share:
    """One point ``(x, y)`` of the sharing polynomial; ``x`` is 1-based and never 0."""

    x: int
    y: int

    def to_bytes(self) -> bytes:
        return self.y.to_bytes(SHARE_BYTES, "big")

    @classmethod
    def from_bytes(cls, x: int, raw: bytes) -> Share:
        if len(raw) != SHARE_BYTES:
            raise ShamirError(f"a share is {SHARE_BYTES} bytes, got {len(raw)}")
        y = int.from_bytes(raw, "big")
        if not 1 <= x < PRIME or y >= PRIME:
            raise ShamirError(f"share ({x}, ...) is outside the field")
        return cls(x, y)


def split(secret: bytes, *, threshold: int, count: int) -> list[Share]:
    """``count`` shares of ``secret``, any ``threshold`` of which reconstruct it."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a secret is {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= count:
        raise ValueError(f"need 1 <= threshold <= count, got threshold={threshold}, count={count}")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return [Share(x, evaluate(coefficients, x)) for x in range(1, count + 1)]


def evaluate(coefficients: Sequence[int], x: int) -> int:
    """The polynomial with ``coefficients`` (constant term first) at ``x``, in the field."""
    value = 0
    for coefficient in reversed(coefficients):  # Horner's rule
        value = (value * x + coefficient) % PRIME
    return value


def polynomial_through(shares: Sequence[Share]) -> list[int]:
    """The coefficients (constant term first) of the polynomial of degree ``len(shares) - 1``
    through ``shares``, whose x-coordinates must be distinct.

    O(t^2) field products and t inversions for t shares, so checking n further shares against
    it (:func:`evaluate`) costs O(n t) more, not a Lagrange interpolation each.
    """
    # prod_j (X - x_j), lowest degree first.
    master = [1]
    for share in shares:
        shifted = [0, *master]
        for degree, coefficient in enumerate(master):
            shifted[degree] = (shifted[degree] - share.x * coefficient) % PRIME
        master = shifted
    coefficients = [0] * len(shares)
    for share in shares:
        # prod_{j != i} (X - x_j) = master / (X - x_i), by synthetic division.
        quotient = [0] * len(shares)
        carry = 0
        for degree in range(len(shares), 0, -1):
            carry = (master[degree] + carry * share.x) % PRIME
            quotient[degree - 1] = carry
        scale = share.y * pow(evaluate(quotient, share.x), -1, PRIME) % PRIME
        for degree, coefficient in enumerate(quotient):
            coefficients[degree] = (coefficients[degree] + scale * coefficient) % PRIME
    return coefficients


def combine(shares: Sequence[Share], *, threshold: int) -> bytes:
    """The secret behind ``shares`` (the first ``threshold`` distinct points are used)."""
    points: dict[int, int] = {}
    for share in shares:
        if share.x in points and points[share.x] != share.y:
            raise ShamirError(f"two different shares claim x = {share.x}")
        points[share.x] = share.y
    if len(points) < threshold:
        raise ShamirError(f"{len(points)} distinct shares, {threshold} are needed")
    chosen = sorted(points.items())[:threshold]
    secret = 0
    for i, (x_i, y_i) in enumerate(chosen):
        numerator, denominator = 1, 1
        for j, (x_j, _) in enumerate(chosen):
            if i != j:
                numerator = numerator * (-x_j) % PRIME
                denominator = denominator * (x_i - x_j) % PRIME
        secret = (secret + y_i * numerator * pow(denominator, -1, PRIME)) % PRIME
    return secret_bytes(secret)


def secret_bytes(secret: int) -> bytes:
    """A rebuilt constant term as the 32-byte secret; ShamirError if it cannot be one."""
    if secret >= 2 ** (8 * SECRET_BYTES):
        raise ShamirError("the shares do not belong to one 32-byte secret")
    return secret.to_bytes(SECRET_BYTES, "big")
