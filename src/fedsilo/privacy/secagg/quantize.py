"""Fixed-point quantization of adapter updates into the ring Z_(2^32), and back.

Masking needs integers: each coordinate ``x`` is clipped to ``[-clip, clip]``, scaled by
``scale`` and rounded half-to-even, then stored as uint32 modulo 2^32 (two's complement), so
that sums and masks are plain wrapping uint32 additions. The sum of the survivors' words is
decoded by reading it as a signed 32-bit integer (the centred lift) and dividing by ``scale``.

Overflow bound. With ``n`` contributors, ``|sum of quantized values| <= n * round(scale * clip)``;
with distributed DP each contributor also adds integer noise, whose sum is Gaussian with
standard deviation at most ``noise_std_sum`` (in update units, before scaling). The decoded sum
is exact as long as the true integer sum stays inside [-2^31, 2^31 - 1]. :func:`plan_quantization`
picks the largest ``scale`` with::

    scale * (n * clip + TAIL_SIGMAS * noise_std_sum) <= 2^31 - 1 - n

(the ``- n`` absorbs one half-unit of rounding per contributor), so the sum of data never wraps,
and the noise would have to exceed ``TAIL_SIGMAS`` = 12 standard deviations, probability below
1e-32 per coordinate, before it wraps. Resolution is ``1 / scale``: the decoded sum is within
``n / (2 * scale)`` of the float sum of the clipped inputs (plus the noise, when on).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

RING_BITS = 32
RING_DTYPE = np.uint32
TAIL_SIGMAS = 12.0
_MAX_SIGNED = 2 ** (RING_BITS - 1) - 1


@dataclass(frozen=True)
class Quantization:
    """How floats map to ring elements in one round (the same at every site and the server).

    ``clip``: per-coordinate bound; ``scale``: ring units per update unit; ``contributors``:
    the most inputs that may be summed (the cohort size), which the overflow bound is for.
    """

    clip: float
    scale: float
    contributors: int

    def __post_init__(self) -> None:
        if not (self.clip > 0 and self.scale > 0 and self.contributors >= 1):
            raise ValueError("clip and scale must be > 0 and contributors >= 1")
        if self.contributors * math.floor(self.scale * self.clip + 0.5) > _MAX_SIGNED:
            raise ValueError(
                f"scale {self.scale:g} with clip {self.clip:g} overflows a sum of "
                f"{self.contributors} inputs in {RING_BITS} bits"
            )


def plan_quantization(
    *, clip: float, contributors: int, noise_std_sum: float = 0.0
) -> Quantization:
    """The finest quantization whose sum of ``contributors`` inputs cannot overflow (see above)."""
    if clip <= 0 or contributors < 1 or noise_std_sum < 0:
        raise ValueError("clip must be > 0, contributors >= 1 and noise_std_sum >= 0")
    span = contributors * clip + TAIL_SIGMAS * noise_std_sum
    scale = (_MAX_SIGNED - contributors) / span
    return Quantization(clip=clip, scale=scale, contributors=contributors)


def quantize(values: np.ndarray, q: Quantization) -> np.ndarray:
    """``values`` (float) clipped, scaled, rounded and wrapped into uint32 words."""
    clipped = np.clip(np.asarray(values, dtype=np.float64), -q.clip, q.clip)
    integers = np.rint(clipped * q.scale).astype(np.int64)
    return integers.astype(RING_DTYPE)  # two's complement wrap: -1 -> 2^32 - 1


def to_signed(words: np.ndarray) -> np.ndarray:
    """The centred lift of uint32 ring elements: the int64 in [-2^31, 2^31) each stands for."""
    return np.asarray(words, dtype=RING_DTYPE).view(np.int32).astype(np.int64)


def dequantize(words: np.ndarray, q: Quantization) -> np.ndarray:
    """Ring elements (a single input or a sum of inputs) back to float64 update units."""
    return to_signed(words).astype(np.float64) / q.scale


def ring_sum(vectors: list[np.ndarray]) -> np.ndarray:
    """Sum of uint32 vectors modulo 2^32 (numpy's uint32 addition wraps)."""
    if not vectors:
        raise ValueError("cannot sum zero vectors")
    total = np.zeros_like(vectors[0], dtype=RING_DTYPE)
    for vector in vectors:
        total += vector
    return total


def resolution(q: Quantization) -> float:
    """The largest decoding error of a sum of ``q.contributors`` inputs, in update units."""
    return q.contributors / (2.0 * q.scale) if math.isfinite(q.scale) else math.inf
