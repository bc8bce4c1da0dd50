"""Distributed DP: each site adds its share of the Gaussian noise before its update leaves it.

The target: the sum of the clipped updates carries Gaussian noise of standard deviation
``noise_multiplier * clip_norm`` (the site-level mechanism of
:class:`fedsilo.privacy.events.SampledSitesGaussianEvent`). Each of the contributing sites adds
independent noise of variance ``(noise_multiplier * clip_norm)^2 / threshold``: the round is
only ever aggregated with at least ``threshold`` contributors, so the sum's noise variance is at
least the target however many sites drop out (more survivors only add noise). Under secure
aggregation the noise is drawn in the quantized domain and rounded to integers (a rounded
Gaussian); docs/privacy.md states what is assumed in accounting it as the Gaussian it rounds.
The generator is seeded from the operating system's secure random source, never by the server.
"""

from __future__ import annotations

import math
import secrets

import numpy as np


def clip_l2(vector: np.ndarray, *, clip_norm: float) -> np.ndarray:
    """``vector`` scaled down to L2 norm at most ``clip_norm``."""
    norm = float(np.linalg.norm(vector))
    return vector * (clip_norm / norm) if norm > clip_norm else vector


def noise_share_std(*, noise_multiplier: float, clip_norm: float, threshold: int) -> float:
    """The standard deviation one site adds so that any ``threshold`` sites reach the target."""
    if noise_multiplier <= 0 or clip_norm <= 0 or threshold < 1:
        raise ValueError("noise_multiplier and clip_norm must be > 0, threshold >= 1")
    return noise_multiplier * clip_norm / math.sqrt(threshold)


def secure_generator() -> np.random.Generator:
    """A generator seeded with 128 bits from the operating system (not the round's seed)."""
    return np.random.default_rng(secrets.randbits(128))


def rounded_gaussian(length: int, *, std: float, generator: np.random.Generator) -> np.ndarray:
    """``length`` samples of N(0, std^2) rounded to the nearest integer (int64)."""
    return np.rint(generator.normal(0.0, std, size=length)).astype(np.int64)
