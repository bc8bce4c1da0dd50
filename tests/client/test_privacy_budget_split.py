"""A run's target epsilon split over its rounds: each round's event, composed, stays within it."""

from __future__ import annotations

import pytest

from fedsilo.client.privacy_budget import plan_round_event
from fedsilo.privacy.accounting import compute_epsilon
from fedsilo.protocol.records import DpTask, RoundTask


def _task(*, batch_size: int, local_epochs: float) -> RoundTask:
    return RoundTask(
        federation_id="f",
        run_id="r",
        stage="train",
        run_name="n",
        round=1,
        cohort_size=4,
        base_model_hash="h",
        local_steps=0,
        batch_size=batch_size,
        learning_rate=1e-3,
        max_length=96,
        max_grad_norm=0.0,
        proximal_mu=0.0,
        seed=0,
        local_epochs=local_epochs,
    )


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_rounds_of_an_epoch_budget_compose_to_at_most_the_target(accountant: str) -> None:
    # A site of 2,000 records, expected batch 256, 2 epochs a round, 5 rounds at epsilon 8.
    dp = DpTask(
        noise_multiplier=0.0,
        target_epsilon=8.0,
        max_grad_norm=1.0,
        delta=1e-5,
        accountant=accountant,
        planned_rounds=5,
    )

    event = plan_round_event(dp, _task(batch_size=256, local_epochs=2.0), num_examples=2000)

    assert (event.sampling_rate, event.steps) == (0.128, 16)
    spent = compute_epsilon([event] * 5, delta=1e-5, accountant=accountant)  # type: ignore[arg-type]
    assert 7.5 < spent <= 8.0
    # A sixth round (a retried one) would overshoot: the split is for the planned rounds only.
    assert compute_epsilon([event] * 6, delta=1e-5, accountant=accountant) > 8.0  # type: ignore[arg-type]
