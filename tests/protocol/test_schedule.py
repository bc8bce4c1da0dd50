"""Local work per round (steps or epochs) and the learning rate of each round."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedsilo.protocol.schedule import local_steps_for, private_local_steps, round_learning_rate


def test_steps_are_taken_as_given() -> None:
    assert local_steps_for(local_steps=7, local_epochs=0, batch_size=8, num_examples=1000) == 7


@pytest.mark.parametrize(
    ("epochs", "batch_size", "examples", "steps"),
    [
        (1.0, 8, 100, 13),  # 12 full batches and one of 4
        (2.0, 8, 100, 26),
        (0.5, 8, 100, 7),  # half an epoch rounds up
        (1.0, 16, 5, 1),  # fewer records than a batch: one batch per epoch
        (0.01, 8, 100, 1),  # never less than one step
        (3.0, 4, 1000, 750),
    ],
)
def test_epochs_become_steps_for_the_site_size(
    epochs: float, batch_size: int, examples: int, steps: int
) -> None:
    assert (
        local_steps_for(
            local_steps=0, local_epochs=epochs, batch_size=batch_size, num_examples=examples
        )
        == steps
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"local_steps": 3, "local_epochs": 1.0}, "exactly one"),
        ({"local_steps": 0, "local_epochs": 0.0}, "exactly one"),
        ({"local_steps": 0, "local_epochs": math.inf}, "finite"),
        ({"local_steps": 0, "local_epochs": 1.0, "num_examples": 0}, "num_examples"),
    ],
)
def test_bad_budgets_are_refused(kwargs: dict[str, float], message: str) -> None:
    arguments = {"batch_size": 4, "num_examples": 10, **kwargs}
    with pytest.raises(ValueError, match=message):
        local_steps_for(**arguments)  # type: ignore[arg-type]


def test_constant_schedule_keeps_the_rate() -> None:
    rates = [
        round_learning_rate(0.01, round_number=r, rounds=5, schedule="constant", warmup_rounds=2)
        for r in range(1, 6)
    ]
    assert rates == [0.01] * 5


def test_cosine_warms_up_then_decays_without_reaching_zero() -> None:
    rates = [
        round_learning_rate(1.0, round_number=r, rounds=6, schedule="cosine", warmup_rounds=2)
        for r in range(1, 7)
    ]

    assert rates[:2] == pytest.approx([1 / 3, 2 / 3])  # linear warmup
    assert rates[2] == pytest.approx(1.0)  # the peak, first round after warmup
    assert rates[2:] == sorted(rates[2:], reverse=True)
    assert rates[3] == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert 0 < rates[-1] < 0.2


def test_cosine_without_warmup_starts_at_the_base_rate() -> None:
    first = round_learning_rate(0.002, round_number=1, rounds=3, schedule="cosine", warmup_rounds=0)
    assert first == pytest.approx(0.002)


def test_round_outside_the_run_is_refused() -> None:
    with pytest.raises(ValueError, match="outside"):
        round_learning_rate(0.1, round_number=4, rounds=3, schedule="cosine", warmup_rounds=0)


@given(
    examples=st.integers(min_value=1, max_value=10_000_000),
    batch_size=st.integers(min_value=1, max_value=65_536),
    epochs=st.floats(min_value=0.01, max_value=50.0),
)
def test_private_steps_from_the_declared_rate_are_the_steps_the_site_trains(
    examples: int, batch_size: int, epochs: float
) -> None:
    # What a private site computes (client/privacy_budget.py) and declares in its DP event.
    sampling_rate = min(1.0, batch_size / examples)
    site_steps = local_steps_for(
        local_steps=0, local_epochs=epochs, batch_size=batch_size, num_examples=examples
    )

    coordinator_steps = private_local_steps(
        local_steps=0, local_epochs=epochs, batch_size=batch_size, sampling_rate=sampling_rate
    )

    assert coordinator_steps == site_steps


def test_private_steps_in_steps_ignore_the_rate() -> None:
    assert private_local_steps(local_steps=5, local_epochs=0, batch_size=8, sampling_rate=0.01) == 5


def test_private_epochs_at_a_thousand_records_per_batch_of_hundred() -> None:
    # 2,000 records, expected batch 256: q = 0.128, 8 batches per epoch.
    assert (
        private_local_steps(local_steps=0, local_epochs=3.0, batch_size=256, sampling_rate=0.128)
        == 24
    )


@pytest.mark.parametrize("rate", [0.0, -0.5, 1.5, math.nan, math.inf, 5e-324])
def test_private_steps_refuse_an_impossible_rate(rate: float) -> None:
    with pytest.raises(ValueError, match="sampling_rate"):
        private_local_steps(local_steps=0, local_epochs=1.0, batch_size=8, sampling_rate=rate)
