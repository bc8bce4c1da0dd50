"""95% intervals for gold-set figures: the percentile bootstrap over records.

A figure on a gold set is a mean over its records (the share of right answers), or a ratio of
sums where each record weighs by its size (next-token accuracy pools tokens). Resampling the
records with replacement and taking the 2.5th and 97.5th percentiles of the resampled figure
gives its interval; the draw is seeded, so the same scores give the same interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0


def bootstrap_ci(
    values: Sequence[float],
    *,
    weights: Sequence[float] | None = None,
    level: float = 0.95,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> tuple[float, float]:
    """The percentile-bootstrap interval of the (weighted) mean of ``values``.

    With ``weights`` the figure is ``sum(w * v) / sum(w)`` (for example hits per token with the
    record's token count as weight). Records are resampled ``resamples`` times with a generator
    seeded by ``seed``. One record, or records that all agree, give a zero-width interval.
    Raises ValueError on no records, mismatched lengths, non-finite values or weights that are
    negative or sum to zero.
    """
    count = len(values)
    if count == 0:
        raise ValueError("cannot bootstrap an empty set of records")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    scores = np.asarray(values, dtype=np.float64)
    mass = np.ones(count) if weights is None else np.asarray(weights, dtype=np.float64)
    if mass.shape != scores.shape:
        raise ValueError(f"{len(mass)} weights for {count} values")
    if not (np.isfinite(scores).all() and np.isfinite(mass).all()):
        raise ValueError("values and weights must be finite")
    if (mass < 0).any() or mass.sum() <= 0:
        raise ValueError("weights must be non-negative and not all zero")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, count, size=(resamples, count))
    picked_mass = mass[picks].sum(axis=1)
    picked_sum = (scores * mass)[picks].sum(axis=1)
    # A resample of only zero-weight records has no figure; it is left out.
    figures = picked_sum[picked_mass > 0] / picked_mass[picked_mass > 0]
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(figures, [tail, 100 - tail])
    return _clean(float(low)), _clean(float(high))


def _clean(value: float) -> float:
    # Sums of 0/1 scores divided by the count are exact up to rounding: 0.30000000000000004
    # reads badly in a table and means 0.3.
    return round(value, 12) if math.isfinite(value) else value


def exact_bounds_at_zero(count: int, *, level: float = 0.95) -> tuple[float, float]:
    """Exact binomial upper bounds on the true rate when 0 of ``count`` records were right.

    There the bootstrap resamples only zeros and its interval is the point [0, 0], which
    claims a certainty the records do not give. Returns the one-sided upper bound at ``level``
    and the upper end of the two-sided Clopper-Pearson interval at ``level``: the rate p at
    which seeing no success in ``count`` tries has probability 1 - level (one-sided) or
    (1 - level) / 2 (two-sided), i.e. p = 1 - alpha ** (1 / count). For ``count`` of ``count``
    right, the lower bounds are 1 minus these.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    alpha = 1 - level
    return 1 - alpha ** (1 / count), 1 - (alpha / 2) ** (1 / count)
