"""Numbers read from a run folder for a report: finite floats or nothing."""

from __future__ import annotations

import math


def recorded_float(value: object) -> float | None:
    """``value`` as a finite float; None for anything else: a bool, text, NaN, an infinity,
    or an integer too large for a float (JSON allows 10**400; ``float`` raises on it)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None
