"""Choosing a noise multiplier from a privacy budget.

:func:`calibrate_noise_multiplier` searches for the smallest noise multiplier whose record-level
round, added to what a site has already spent, stays within a target epsilon;
:func:`calibrate_site_noise_multiplier` does the same for site-level DP over a whole run. Every
candidate is judged by :func:`~fedsilo.privacy.accounting.compute_epsilon` itself, on the same
history that will be accounted afterwards, so the answer never overshoots the target as the
accountant computes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from fedsilo.config.schema import MIN_RECORD_NOISE_MULTIPLIER
from fedsilo.privacy.accounting import AccountantName, compute_epsilon
from fedsilo.privacy.events import DpEvent, PoissonGaussianEvent, SampledSitesGaussianEvent


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return float(value)


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sampling_rate: float,
    steps: int,
    accountant: AccountantName = "rdp",
    tolerance: float = 0.01,
    max_noise: float = 1000.0,
    prior_events: Sequence[DpEvent] = (),
    min_noise: float = MIN_RECORD_NOISE_MULTIPLIER,
) -> float:
    """The smallest noise multiplier ``z`` (to within ``tolerance``) that keeps the budget,
    and at least ``min_noise`` (a larger target is then underspent, never exceeded).

    Returns ``z`` such that ``compute_epsilon([*prior_events, PoissonGaussianEvent(z,
    sampling_rate, steps)], delta=delta, accountant=accountant) <= target_epsilon`` holds as
    computed, and the same with ``z - tolerance`` in its place is above the target (when
    ``z - tolerance > 0``, assuming epsilon does not increase with the noise).
    ``prior_events`` is the budget already spent, so a site can size its next round against
    what remains.

    Search: ``z`` doubles from ``min(1, max_noise)`` until the budget holds (capped at
    ``max_noise``), then bisects between the last failing and first passing value until they are
    within ``tolerance``; the passing end is returned, or ``min_noise`` where the answer lies
    below it. Candidates below ``min_noise`` count as failing without being computed, so the
    accountants never see them (they grow slow and then fail there). ``min_noise`` defaults to
    the smallest noise a coordinator admits
    (:data:`~fedsilo.config.schema.MIN_RECORD_NOISE_MULTIPLIER`).

    Raises:
        ValueError: an argument out of range (``target_epsilon``, ``tolerance`` and ``max_noise``
            must be finite and > 0, ``delta`` in (0, 1), ``sampling_rate`` in (0, 1], ``steps``
            >= 1), or even ``max_noise`` exceeds the target (for instance when ``prior_events``
            already spend it).
        UnsupportedEventError: ``accountant`` cannot account ``prior_events`` with a
            record-level round.
    """
    target = _positive("target_epsilon", target_epsilon)
    step = _positive("tolerance", tolerance)
    ceiling = _positive("max_noise", max_noise)
    # Validates sampling_rate and steps (and delta, below) before any search.
    PoissonGaussianEvent(ceiling, sampling_rate, steps)
    history = tuple(prior_events)

    def epsilon_at(noise: float) -> float:
        event = PoissonGaussianEvent(noise, sampling_rate, steps)
        return compute_epsilon((*history, event), delta=delta, accountant=accountant)

    return _smallest_noise(
        epsilon_at,
        target=target,
        tolerance=step,
        ceiling=ceiling,
        context=f"at delta={delta} with {len(history)} prior event(s)",
        floor=_positive("min_noise", min_noise),
    )


def calibrate_site_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sites_per_round: int,
    num_sites: int,
    rounds: int,
    accountant: AccountantName = "rdp",
    tolerance: float = 0.01,
    max_noise: float = 1000.0,
) -> float:
    """The smallest ``[privacy] site_noise_multiplier`` (to within ``tolerance``) that keeps a
    run of ``rounds`` site-level rounds, ``sites_per_round`` of ``num_sites`` sites each, within
    ``target_epsilon`` at ``delta`` (:class:`~fedsilo.privacy.events.SampledSitesGaussianEvent`).

    Raises:
        ValueError: an argument out of range (as :func:`calibrate_noise_multiplier`, and the
            fields of the event), or even ``max_noise`` exceeds the target.
    """
    target = _positive("target_epsilon", target_epsilon)
    step = _positive("tolerance", tolerance)
    ceiling = _positive("max_noise", max_noise)
    SampledSitesGaussianEvent(ceiling, sites_per_round, num_sites, rounds)

    def epsilon_at(noise: float) -> float:
        event = SampledSitesGaussianEvent(noise, sites_per_round, num_sites, rounds)
        return compute_epsilon([event], delta=delta, accountant=accountant)

    return _smallest_noise(
        epsilon_at,
        target=target,
        tolerance=step,
        ceiling=ceiling,
        context=f"at delta={delta} for {rounds} round(s) of {sites_per_round} of {num_sites} sites",
    )


def _smallest_noise(
    epsilon_at: Callable[[float], float],
    *,
    target: float,
    tolerance: float,
    ceiling: float,
    context: str,
    floor: float = 0.0,
) -> float:
    """Doubling from ``min(1, ceiling)`` until ``epsilon_at`` meets ``target``, then bisection
    to within ``tolerance``, never below ``floor``; the passing end is returned (epsilon
    assumed not to increase with the noise)."""
    failing, passing = 0.0, min(1.0, ceiling)
    epsilon = epsilon_at(passing)
    while epsilon > target:
        if passing >= ceiling:
            raise ValueError(
                f"even noise_multiplier={ceiling} (max_noise) gives epsilon={epsilon:.6g} > "
                f"target_epsilon={target} {context}"
            )
        failing, passing = passing, min(2.0 * passing, ceiling)
        epsilon = epsilon_at(passing)
    while passing - failing > tolerance:
        middle = (failing + passing) / 2.0
        if not failing < middle < passing:
            break  # a tolerance below float resolution: no narrower bracket exists
        # Below the floor a candidate counts as failing unevaluated: the search takes the path
        # it would take without a floor whenever the answer is above it.
        if middle >= floor and epsilon_at(middle) <= target:
            passing = middle
        else:
            failing = middle
    if failing < floor < passing and epsilon_at(floor) <= target:
        return floor
    return passing
