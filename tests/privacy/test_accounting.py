"""Accounting: values equal dp-accounting called directly; composition; refusals; the record."""

from __future__ import annotations

from collections.abc import Sequence

import dp_accounting
import pytest
from dp_accounting import NeighboringRelation
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from fedsilo.privacy.accounting import (
    SpendingRecord,
    UnsupportedEventError,
    compute_epsilon,
    epsilon_per_round,
)
from fedsilo.privacy.events import DpEvent, PoissonGaussianEvent, SampledSitesGaussianEvent

DELTA = 1e-5


def _direct_rdp(
    rounds: Sequence[dp_accounting.DpEvent],
    relation: NeighboringRelation = NeighboringRelation.ADD_OR_REMOVE_ONE,
) -> float:
    """Epsilon from an RdpAccountant built by hand, composing one round at a time."""
    accountant = RdpAccountant(neighboring_relation=relation)
    for event in rounds:
        accountant.compose(event)
    return float(accountant.get_epsilon(DELTA))


def _direct_pld(rounds: Sequence[dp_accounting.DpEvent]) -> float:
    accountant = PLDAccountant(neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE)
    for event in rounds:
        accountant.compose(event)
    return float(accountant.get_epsilon(DELTA))


def _dp_sgd(noise: float, rate: float, steps: int) -> dp_accounting.DpEvent:
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise)), steps
    )


SETTINGS = [(1.1, 0.01, 100), (0.8, 0.05, 20), (2.0, 1.0, 5), (0.6, 0.2, 1)]


@pytest.mark.parametrize(("noise", "rate", "steps"), SETTINGS)
def test_rdp_epsilon_of_one_round_equals_dp_accounting(
    noise: float, rate: float, steps: int
) -> None:
    expected = _direct_rdp([_dp_sgd(noise, rate, steps)])

    epsilon = compute_epsilon([PoissonGaussianEvent(noise, rate, steps)], delta=DELTA)

    assert epsilon == pytest.approx(expected, rel=1e-9)


def test_rdp_epsilon_of_rounds_composed_equals_dp_accounting() -> None:
    rounds = [(1.1, 0.01, 100), (0.8, 0.05, 20), (1.1, 0.01, 100), (2.0, 1.0, 5), (1.1, 0.01, 100)]
    expected = _direct_rdp([_dp_sgd(*setting) for setting in rounds])

    epsilon = compute_epsilon([PoissonGaussianEvent(*setting) for setting in rounds], delta=DELTA)

    assert epsilon == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(("noise", "rate", "steps"), [(1.1, 0.01, 100), (2.0, 1.0, 5)])
def test_pld_epsilon_of_one_round_equals_dp_accounting(
    noise: float, rate: float, steps: int
) -> None:
    expected = _direct_pld([_dp_sgd(noise, rate, steps)])

    epsilon = compute_epsilon(
        [PoissonGaussianEvent(noise, rate, steps)], delta=DELTA, accountant="pld"
    )

    assert epsilon == pytest.approx(expected, rel=1e-9)


def test_pld_epsilon_of_rounds_composed_equals_dp_accounting() -> None:
    rounds = [(1.1, 0.01, 30), (0.8, 0.05, 10), (1.1, 0.01, 30)]
    expected = _direct_pld([_dp_sgd(*setting) for setting in rounds])

    epsilon = compute_epsilon(
        [PoissonGaussianEvent(*setting) for setting in rounds], delta=DELTA, accountant="pld"
    )

    assert epsilon == pytest.approx(expected, rel=1e-9)


def test_sampled_sites_epsilon_equals_dp_accounting_replace_one() -> None:
    event = SampledSitesGaussianEvent(
        noise_multiplier=4.0, sites_per_round=10, num_sites=50, rounds=3
    )
    round_event = dp_accounting.SampledWithoutReplacementDpEvent(
        50, 10, dp_accounting.GaussianDpEvent(2.0)
    )
    expected = _direct_rdp([round_event] * 3, NeighboringRelation.REPLACE_ONE)

    epsilon = compute_epsilon([event], delta=DELTA)

    assert epsilon == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_all_sites_every_round_equals_plain_gaussian_composition(accountant: str) -> None:
    event = SampledSitesGaussianEvent(
        noise_multiplier=5.0, sites_per_round=6, num_sites=6, rounds=4
    )
    direct = RdpAccountant() if accountant == "rdp" else PLDAccountant()
    expected = float(direct.compose(dp_accounting.GaussianDpEvent(5.0), 4).get_epsilon(DELTA))

    epsilon = compute_epsilon([event], delta=DELTA, accountant=accountant)  # type: ignore[arg-type]

    assert epsilon == pytest.approx(expected, rel=1e-9)


def test_all_sites_epsilon_bounds_the_exact_gaussian_epsilon() -> None:
    # Four rounds of noise multiplier 5 are one Gaussian of multiplier 5 / sqrt(4); its exact
    # (analytic) epsilon is a lower bound that PLD reaches closely and RDP stays above.
    event = SampledSitesGaussianEvent(
        noise_multiplier=5.0, sites_per_round=6, num_sites=6, rounds=4
    )
    exact = dp_accounting.get_epsilon_gaussian(2.5, DELTA)

    pld = compute_epsilon([event], delta=DELTA, accountant="pld")
    rdp = compute_epsilon([event], delta=DELTA, accountant="rdp")

    assert exact <= pld <= exact * (1 + 1e-6)
    assert rdp > pld


def test_epsilon_grows_with_steps() -> None:
    epsilons = [
        compute_epsilon([PoissonGaussianEvent(1.0, 0.02, steps)], delta=DELTA)
        for steps in (1, 10, 100, 1000)
    ]

    assert epsilons == sorted(epsilons)
    assert len(set(epsilons)) == len(epsilons)


def test_epsilon_shrinks_with_noise() -> None:
    epsilons = [
        compute_epsilon([PoissonGaussianEvent(noise, 0.02, 100)], delta=DELTA)
        for noise in (0.5, 1.0, 2.0, 8.0)
    ]

    assert epsilons == sorted(epsilons, reverse=True)
    assert len(set(epsilons)) == len(epsilons)


def test_epsilon_grows_with_rounds() -> None:
    event = PoissonGaussianEvent(1.0, 0.02, 50)

    epsilons = [compute_epsilon([event] * rounds, delta=DELTA) for rounds in (1, 2, 5)]

    assert epsilons[0] < epsilons[1] < epsilons[2]


def test_epsilon_does_not_depend_on_the_order_of_events() -> None:
    first, second = PoissonGaussianEvent(1.0, 0.02, 50), PoissonGaussianEvent(0.7, 0.1, 10)

    interleaved = compute_epsilon([first, second, first], delta=DELTA)
    grouped = compute_epsilon([first, first, second], delta=DELTA)

    assert interleaved == pytest.approx(grouped, rel=1e-12)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_no_events_is_what_a_fresh_accountant_returns(accountant: str) -> None:
    fresh = RdpAccountant() if accountant == "rdp" else PLDAccountant()

    epsilon = compute_epsilon([], delta=DELTA, accountant=accountant)  # type: ignore[arg-type]

    assert epsilon == float(fresh.get_epsilon(DELTA)) == 0.0


def test_pld_refuses_sampling_of_sites() -> None:
    event = SampledSitesGaussianEvent(
        noise_multiplier=4.0, sites_per_round=10, num_sites=50, rounds=3
    )

    with pytest.raises(UnsupportedEventError, match=r"events\[0\].*'pld'"):
        compute_epsilon([event], delta=DELTA, accountant="pld")


def test_record_and_site_level_events_are_not_composed() -> None:
    events: list[DpEvent] = [
        PoissonGaussianEvent(1.0, 0.02, 50),
        SampledSitesGaussianEvent(noise_multiplier=2.0, sites_per_round=3, num_sites=3, rounds=1),
    ]

    with pytest.raises(UnsupportedEventError, match=r"events\[1\].*different units"):
        compute_epsilon(events, delta=DELTA)


def test_site_events_with_and_without_sampling_are_not_composed() -> None:
    events: list[DpEvent] = [
        SampledSitesGaussianEvent(noise_multiplier=2.0, sites_per_round=3, num_sites=3, rounds=1),
        SampledSitesGaussianEvent(noise_multiplier=2.0, sites_per_round=2, num_sites=3, rounds=1),
    ]

    with pytest.raises(UnsupportedEventError, match=r"events\[1\].*REPLACE_ONE"):
        compute_epsilon(events, delta=DELTA)


def test_unsupported_event_error_is_a_value_error() -> None:
    assert issubclass(UnsupportedEventError, ValueError)


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, float("nan"), True, "1e-5"])
def test_delta_outside_open_unit_interval_is_rejected(delta: float) -> None:
    with pytest.raises(ValueError, match="delta"):
        compute_epsilon([PoissonGaussianEvent(1.0, 0.02, 5)], delta=delta)


def test_unknown_accountant_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"accountant.*'prv'"):
        compute_epsilon([PoissonGaussianEvent(1.0, 0.02, 5)], delta=DELTA, accountant="prv")  # type: ignore[arg-type]


def test_a_foreign_event_is_rejected() -> None:
    with pytest.raises(TypeError, match=r"events\[0\]"):
        compute_epsilon([dp_accounting.GaussianDpEvent(1.0)], delta=DELTA)  # type: ignore[list-item]


def test_epsilon_per_round_matches_compute_epsilon_of_each_prefix() -> None:
    events = [PoissonGaussianEvent(1.0, 0.02, 50), PoissonGaussianEvent(0.7, 0.1, 10)] * 2

    per_round = epsilon_per_round(events, delta=DELTA, accountant="rdp")

    prefixes = [compute_epsilon(events[:end], delta=DELTA) for end in range(1, len(events) + 1)]
    assert per_round == pytest.approx(prefixes, rel=1e-12)


def test_pld_epsilon_per_round_matches_compute_epsilon_of_each_prefix() -> None:
    events = [PoissonGaussianEvent(1.0, 0.02, 20)] * 3

    per_round = epsilon_per_round(events, delta=DELTA, accountant="pld")

    prefixes = [
        compute_epsilon(events[:end], delta=DELTA, accountant="pld")
        for end in range(1, len(events) + 1)
    ]
    assert per_round == pytest.approx(prefixes, rel=1e-9)


def test_epsilon_per_round_refuses_an_unsupported_history() -> None:
    event = SampledSitesGaussianEvent(
        noise_multiplier=4.0, sites_per_round=10, num_sites=50, rounds=3
    )

    with pytest.raises(UnsupportedEventError):
        epsilon_per_round([event], delta=DELTA, accountant="pld")


def test_epsilon_per_round_is_non_decreasing() -> None:
    events = [PoissonGaussianEvent(1.0, 0.02, 50), PoissonGaussianEvent(3.0, 0.1, 10)] * 2

    per_round = epsilon_per_round(events, delta=DELTA, accountant="rdp")

    assert per_round == sorted(per_round)


def test_epsilon_per_round_of_no_events_is_empty() -> None:
    assert epsilon_per_round([], delta=DELTA, accountant="rdp") == []


def test_spending_record_keeps_events_in_order() -> None:
    first, second = PoissonGaussianEvent(1.0, 0.02, 50), PoissonGaussianEvent(0.7, 0.1, 10)
    spending = SpendingRecord()

    spending.record(first)
    spending.record(second)

    assert spending.events == (first, second)


def test_spending_record_epsilon_is_compute_epsilon_of_its_events() -> None:
    events = (PoissonGaussianEvent(1.0, 0.02, 50), PoissonGaussianEvent(0.7, 0.1, 10))
    spending = SpendingRecord(events)

    epsilon = spending.epsilon(delta=DELTA)

    assert epsilon == compute_epsilon(events, delta=DELTA)


def test_epsilon_if_matches_compute_epsilon_of_the_extended_list() -> None:
    spending = SpendingRecord((PoissonGaussianEvent(1.0, 0.02, 50),) * 3)
    candidate = PoissonGaussianEvent(0.9, 0.05, 20)

    epsilon = spending.epsilon_if(candidate, delta=DELTA, accountant="rdp")

    assert epsilon == compute_epsilon([*spending.events, candidate], delta=DELTA)
    assert len(spending.events) == 3


def test_spending_record_refuses_an_event_of_another_unit() -> None:
    spending = SpendingRecord((PoissonGaussianEvent(1.0, 0.02, 50),))
    site_event = SampledSitesGaussianEvent(
        noise_multiplier=2.0, sites_per_round=3, num_sites=3, rounds=1
    )

    with pytest.raises(UnsupportedEventError):
        spending.record(site_event)
    assert spending.events == (PoissonGaussianEvent(1.0, 0.02, 50),)
