"""DP events: validation, the exact dp-accounting events they stand for, and their JSON form."""

from __future__ import annotations

import json

import dp_accounting
import pytest
from dp_accounting import NeighboringRelation
from dp_accounting.rdp import RdpAccountant
from hypothesis import given
from hypothesis import strategies as st

from fedsilo.privacy.events import (
    DpEvent,
    PoissonGaussianEvent,
    SampledSitesGaussianEvent,
    event_from_json,
    event_to_json,
    neighboring_relation,
    to_dp_accounting,
)

_noise = st.floats(min_value=1e-3, max_value=1e4, allow_nan=False, allow_infinity=False)
_poisson_events = st.builds(
    PoissonGaussianEvent,
    noise_multiplier=_noise,
    sampling_rate=st.floats(min_value=1e-9, max_value=1.0, exclude_min=False),
    steps=st.integers(min_value=1, max_value=10**9),
)
_site_events = st.integers(min_value=1, max_value=10_000).flatmap(
    lambda num_sites: st.builds(
        SampledSitesGaussianEvent,
        noise_multiplier=_noise,
        sites_per_round=st.integers(min_value=1, max_value=num_sites),
        num_sites=st.just(num_sites),
        rounds=st.integers(min_value=1, max_value=10**6),
    )
)
_events: st.SearchStrategy[DpEvent] = st.one_of(_poisson_events, _site_events)


def test_poisson_event_stores_an_integer_noise_multiplier_as_float() -> None:
    event = PoissonGaussianEvent(noise_multiplier=2, sampling_rate=1, steps=3)

    assert type(event.noise_multiplier) is float
    assert type(event.sampling_rate) is float


@pytest.mark.parametrize(
    ("fields", "field_name"),
    [
        ({"noise_multiplier": 0.0}, "noise_multiplier"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"noise_multiplier": float("nan")}, "noise_multiplier"),
        ({"noise_multiplier": float("inf")}, "noise_multiplier"),
        ({"noise_multiplier": True}, "noise_multiplier"),
        ({"noise_multiplier": "1.0"}, "noise_multiplier"),
        ({"sampling_rate": 0.0}, "sampling_rate"),
        ({"sampling_rate": 1.5}, "sampling_rate"),
        ({"sampling_rate": float("nan")}, "sampling_rate"),
        ({"steps": 0}, "steps"),
        ({"steps": 2.0}, "steps"),
        ({"steps": True}, "steps"),
    ],
)
def test_poisson_event_rejects_invalid_field(fields: dict[str, object], field_name: str) -> None:
    values: dict[str, object] = {"noise_multiplier": 1.0, "sampling_rate": 0.1, "steps": 10}
    values.update(fields)

    with pytest.raises(ValueError, match=f"PoissonGaussianEvent.{field_name}"):
        PoissonGaussianEvent(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "field_name"),
    [
        ({"noise_multiplier": 0.0}, "noise_multiplier"),
        ({"num_sites": 0, "sites_per_round": 0}, "num_sites"),
        ({"sites_per_round": 0}, "sites_per_round"),
        ({"sites_per_round": 11}, "sites_per_round"),
        ({"rounds": 0}, "rounds"),
        ({"rounds": 1.0}, "rounds"),
    ],
)
def test_sampled_sites_event_rejects_invalid_field(
    fields: dict[str, object], field_name: str
) -> None:
    values: dict[str, object] = {
        "noise_multiplier": 1.0,
        "sites_per_round": 5,
        "num_sites": 10,
        "rounds": 3,
    }
    values.update(fields)

    with pytest.raises(ValueError, match=f"SampledSitesGaussianEvent.{field_name}"):
        SampledSitesGaussianEvent(**values)  # type: ignore[arg-type]


def test_poisson_event_stands_for_self_composed_poisson_sampled_gaussian() -> None:
    event = PoissonGaussianEvent(noise_multiplier=1.1, sampling_rate=0.01, steps=50)

    expected = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.1)), 50
    )
    assert to_dp_accounting(event) == expected
    assert neighboring_relation(event) is NeighboringRelation.ADD_OR_REMOVE_ONE


def test_all_sites_event_stands_for_composed_gaussian_under_add_or_remove() -> None:
    event = SampledSitesGaussianEvent(
        noise_multiplier=0.9, sites_per_round=4, num_sites=4, rounds=7
    )

    expected = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(0.9), 7)
    assert to_dp_accounting(event) == expected
    assert neighboring_relation(event) is NeighboringRelation.ADD_OR_REMOVE_ONE


def test_sampled_sites_event_stands_for_sampling_without_replacement_under_replace_one() -> None:
    event = SampledSitesGaussianEvent(
        noise_multiplier=3.0, sites_per_round=5, num_sites=20, rounds=7
    )

    # Replacing one site moves the sum of S-clipped updates by up to 2 S: multiplier 3.0 / 2.
    expected = dp_accounting.SelfComposedDpEvent(
        dp_accounting.SampledWithoutReplacementDpEvent(20, 5, dp_accounting.GaussianDpEvent(1.5)),
        7,
    )
    assert to_dp_accounting(event) == expected
    assert neighboring_relation(event) is NeighboringRelation.REPLACE_ONE


def test_dp_accounting_reads_the_sampled_gaussian_as_relative_to_replace_one_sensitivity() -> None:
    # The halving above rests on this: sampling every site equals the plain Gaussian with the
    # same multiplier, i.e. the multiplier is noise over the sensitivity under REPLACE_ONE.
    every_site = dp_accounting.SampledWithoutReplacementDpEvent(
        10, 10, dp_accounting.GaussianDpEvent(1.5)
    )
    sampled = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    plain = RdpAccountant()

    sampled_epsilon = sampled.compose(every_site).get_epsilon(1e-5)
    plain_epsilon = plain.compose(dp_accounting.GaussianDpEvent(1.5)).get_epsilon(1e-5)

    assert sampled_epsilon == pytest.approx(plain_epsilon, rel=1e-12)


def test_to_dp_accounting_rejects_a_foreign_event() -> None:
    with pytest.raises(TypeError, match="GaussianDpEvent"):
        to_dp_accounting(dp_accounting.GaussianDpEvent(1.0))  # type: ignore[arg-type]


def test_event_to_json_writes_type_and_fields() -> None:
    event = PoissonGaussianEvent(noise_multiplier=1.1, sampling_rate=0.01, steps=50)

    data = event_to_json(event)

    assert data == {
        "type": "poisson_gaussian",
        "noise_multiplier": 1.1,
        "sampling_rate": 0.01,
        "steps": 50,
    }


@given(_events)
def test_json_round_trip_through_text_gives_the_same_event(event: DpEvent) -> None:
    text = json.dumps(event_to_json(event), allow_nan=False)

    restored = event_from_json(json.loads(text))

    assert restored == event
    assert type(restored) is type(event)


def test_event_from_json_accepts_an_integer_for_a_float_field() -> None:
    data = {"type": "poisson_gaussian", "noise_multiplier": 2, "sampling_rate": 1, "steps": 5}

    event = event_from_json(data)

    assert event == PoissonGaussianEvent(2.0, 1.0, 5)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"noise_multiplier": 1.0, "sampling_rate": 0.1, "steps": 5}, "type"),
        ({"type": "laplace", "noise_multiplier": 1.0}, "laplace"),
        ({"type": 3, "noise_multiplier": 1.0}, "type"),
        (
            {
                "type": "poisson_gaussian",
                "noise_multiplier": 1.0,
                "sampling_rate": 0.1,
                "steps": 5,
                "clip": 1.0,
            },
            "unknown field.*clip",
        ),
        (
            {"type": "poisson_gaussian", "noise_multiplier": 1.0, "sampling_rate": 0.1},
            "missing field.*steps",
        ),
        (
            {"type": "poisson_gaussian", "noise_multiplier": "1", "sampling_rate": 0.1, "steps": 5},
            "noise_multiplier",
        ),
        (
            {
                "type": "poisson_gaussian",
                "noise_multiplier": 1.0,
                "sampling_rate": 0.1,
                "steps": 5.0,
            },
            "steps",
        ),
        (
            {
                "type": "sampled_sites_gaussian",
                "noise_multiplier": 1.0,
                "sites_per_round": 5,
                "num_sites": 4,
                "rounds": 1,
            },
            "sites_per_round",
        ),
    ],
)
def test_event_from_json_rejects_malformed_data(data: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        event_from_json(data)


def test_event_from_json_rejects_a_non_object() -> None:
    with pytest.raises(ValueError, match="JSON object"):
        event_from_json(["poisson_gaussian", 1.0, 0.1, 5])  # type: ignore[arg-type]
