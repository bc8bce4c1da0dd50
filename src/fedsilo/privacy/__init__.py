"""Differential privacy: DP events, privacy accounting and noise calibration.

A mechanism that touches data is recorded as a DP event (:mod:`fedsilo.privacy.events`), data
that is stored and replayed; epsilon is a pure function of a history of events
(:mod:`fedsilo.privacy.accounting`, on dp-accounting's RDP and PLD accountants); and
:mod:`fedsilo.privacy.calibration` picks the noise for a round from what a budget has left.
"""

from fedsilo.privacy.accounting import (
    AccountantName,
    SpendingRecord,
    UnsupportedEventError,
    compute_epsilon,
    epsilon_per_round,
)
from fedsilo.privacy.calibration import (
    calibrate_noise_multiplier,
    calibrate_site_noise_multiplier,
)
from fedsilo.privacy.events import (
    DpEvent,
    PoissonGaussianEvent,
    SampledSitesGaussianEvent,
    event_from_json,
    event_to_json,
    neighboring_relation,
    to_dp_accounting,
)

__all__ = [
    "AccountantName",
    "DpEvent",
    "PoissonGaussianEvent",
    "SampledSitesGaussianEvent",
    "SpendingRecord",
    "UnsupportedEventError",
    "calibrate_noise_multiplier",
    "calibrate_site_noise_multiplier",
    "compute_epsilon",
    "epsilon_per_round",
    "event_from_json",
    "event_to_json",
    "neighboring_relation",
    "to_dp_accounting",
]
