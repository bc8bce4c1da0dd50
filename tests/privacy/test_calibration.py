"""Noise calibration: never above the target as computed, and near-minimal."""

from __future__ import annotations

import dp_accounting
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsilo.config.schema import MIN_RECORD_NOISE_MULTIPLIER
from fedsilo.privacy.accounting import UnsupportedEventError, compute_epsilon
from fedsilo.privacy.calibration import (
    calibrate_noise_multiplier,
    calibrate_site_noise_multiplier,
)
from fedsilo.privacy.events import PoissonGaussianEvent, SampledSitesGaussianEvent

TOLERANCE = 0.01

_settings = st.fixed_dictionaries(
    {
        "target_epsilon": st.floats(min_value=0.5, max_value=20.0),
        "delta": st.floats(min_value=1e-7, max_value=1e-3),
        "sampling_rate": st.floats(min_value=0.001, max_value=0.5),
        "steps": st.integers(min_value=1, max_value=500),
    }
)


def _epsilon(noise: float, setting: dict[str, float]) -> float:
    event = PoissonGaussianEvent(noise, setting["sampling_rate"], int(setting["steps"]))
    return compute_epsilon([event], delta=setting["delta"])


# One property for both halves of the contract: each example costs a whole calibration.
@settings(max_examples=25, deadline=None)
@given(_settings)
def test_calibrated_noise_meets_the_target_and_is_minimal_to_tolerance(
    setting: dict[str, float],
) -> None:
    noise = calibrate_noise_multiplier(**setting, tolerance=TOLERANCE)  # type: ignore[arg-type]

    assert _epsilon(noise, setting) <= setting["target_epsilon"]
    assert noise >= MIN_RECORD_NOISE_MULTIPLIER
    if noise - TOLERANCE > MIN_RECORD_NOISE_MULTIPLIER:
        assert _epsilon(noise - TOLERANCE, setting) > setting["target_epsilon"]


def test_a_generous_target_is_underspent_at_the_admitted_floor_not_below_it() -> None:
    # At q = 0.001 over one step even z = 0.1 stays under epsilon 20, but no coordinator
    # admits noise below the floor (the accountants fail there).
    noise = calibrate_noise_multiplier(
        target_epsilon=20.0, delta=1e-5, sampling_rate=0.001, steps=1
    )

    assert noise == MIN_RECORD_NOISE_MULTIPLIER
    assert _epsilon(noise, {"sampling_rate": 0.001, "steps": 1, "delta": 1e-5}) <= 20.0


def test_calibration_with_pld_never_overshoots() -> None:
    noise = calibrate_noise_multiplier(
        target_epsilon=2.0, delta=1e-5, sampling_rate=0.02, steps=10, accountant="pld"
    )

    event = PoissonGaussianEvent(noise, 0.02, 10)
    assert compute_epsilon([event], delta=1e-5, accountant="pld") <= 2.0


def test_calibration_against_prior_events_keeps_the_total_within_target() -> None:
    prior = [PoissonGaussianEvent(1.0, 0.02, 50)] * 3

    noise = calibrate_noise_multiplier(
        target_epsilon=3.0, delta=1e-5, sampling_rate=0.02, steps=50, prior_events=prior
    )

    total = compute_epsilon([*prior, PoissonGaussianEvent(noise, 0.02, 50)], delta=1e-5)
    assert total <= 3.0


def test_prior_events_call_for_more_noise() -> None:
    prior = [PoissonGaussianEvent(1.0, 0.02, 50)] * 3
    fresh = calibrate_noise_multiplier(target_epsilon=3.0, delta=1e-5, sampling_rate=0.02, steps=50)

    after_prior = calibrate_noise_multiplier(
        target_epsilon=3.0, delta=1e-5, sampling_rate=0.02, steps=50, prior_events=prior
    )

    assert after_prior > fresh


def test_unreachable_target_within_max_noise_is_an_error() -> None:
    with pytest.raises(ValueError, match="max_noise"):
        calibrate_noise_multiplier(
            target_epsilon=0.5, delta=1e-5, sampling_rate=0.5, steps=100, max_noise=2.0
        )


def test_budget_already_spent_by_prior_events_is_an_error() -> None:
    prior = [PoissonGaussianEvent(0.5, 0.5, 100)]

    with pytest.raises(ValueError, match="1 prior event"):
        calibrate_noise_multiplier(
            target_epsilon=1.0, delta=1e-5, sampling_rate=0.01, steps=10, prior_events=prior
        )


def test_site_level_prior_events_are_refused() -> None:
    prior = [
        SampledSitesGaussianEvent(noise_multiplier=2.0, sites_per_round=3, num_sites=3, rounds=1)
    ]

    with pytest.raises(UnsupportedEventError):
        calibrate_noise_multiplier(
            target_epsilon=10.0, delta=1e-5, sampling_rate=0.01, steps=10, prior_events=prior
        )


@pytest.mark.parametrize(
    ("override", "name"),
    [
        ({"target_epsilon": 0.0}, "target_epsilon"),
        ({"target_epsilon": float("inf")}, "target_epsilon"),
        ({"delta": 1.0}, "delta"),
        ({"sampling_rate": 0.0}, "sampling_rate"),
        ({"steps": 0}, "steps"),
        ({"tolerance": 0.0}, "tolerance"),
        ({"max_noise": -1.0}, "max_noise"),
    ],
)
def test_invalid_argument_is_rejected(override: dict[str, float], name: str) -> None:
    arguments: dict[str, float] = {
        "target_epsilon": 1.0,
        "delta": 1e-5,
        "sampling_rate": 0.01,
        "steps": 10,
    }
    arguments.update(override)

    with pytest.raises(ValueError, match=name):
        calibrate_noise_multiplier(**arguments)  # type: ignore[arg-type]


def _site_level_reference(noise: float, sites_per_round: int, num_sites: int, rounds: int) -> float:
    """Epsilon at delta 1e-5 from dp-accounting directly, as events.py documents the mechanism."""
    relation = dp_accounting.NeighboringRelation
    if sites_per_round == num_sites:
        event: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(noise)
        accountant = dp_accounting.rdp.RdpAccountant(
            neighboring_relation=relation.ADD_OR_REMOVE_ONE
        )
    else:
        event = dp_accounting.SampledWithoutReplacementDpEvent(
            num_sites, sites_per_round, dp_accounting.GaussianDpEvent(noise / 2)
        )
        accountant = dp_accounting.rdp.RdpAccountant(neighboring_relation=relation.REPLACE_ONE)
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return float(accountant.get_epsilon(1e-5))


@pytest.mark.parametrize(
    ("sites_per_round", "num_sites", "rounds", "target"),
    [(10, 10, 20, 8.0), (10, 100, 20, 3.0), (100, 1000, 20, 1.0), (30, 1000, 200, 8.0)],
)
def test_site_level_calibration_meets_the_target_by_dp_accounting_and_is_minimal(
    sites_per_round: int, num_sites: int, rounds: int, target: float
) -> None:
    noise = calibrate_site_noise_multiplier(
        target_epsilon=target,
        delta=1e-5,
        sites_per_round=sites_per_round,
        num_sites=num_sites,
        rounds=rounds,
        tolerance=TOLERANCE,
    )

    assert _site_level_reference(noise, sites_per_round, num_sites, rounds) <= target
    assert _site_level_reference(noise - TOLERANCE, sites_per_round, num_sites, rounds) > target


def test_site_level_calibration_names_what_cannot_be_met() -> None:
    with pytest.raises(ValueError, match="20 round"):
        calibrate_site_noise_multiplier(
            target_epsilon=0.1, delta=1e-5, sites_per_round=4, num_sites=4, rounds=20, max_noise=2.0
        )
    with pytest.raises(ValueError, match="sites_per_round"):
        calibrate_site_noise_multiplier(
            target_epsilon=8.0, delta=1e-5, sites_per_round=5, num_sites=4, rounds=20
        )
