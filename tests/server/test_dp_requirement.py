"""The coordinator's check of a site's record-level DP event, in steps and in epochs."""

from __future__ import annotations

import math

import pytest
from flwr.app import ConfigRecord, RecordDict

from fedsilo.privacy.accounting import compute_epsilon
from fedsilo.privacy.events import PoissonGaussianEvent, event_from_json, event_to_json
from fedsilo.protocol.records import DP_EVENT_KEY, SiteMetrics
from fedsilo.server.admission import (
    DpRequirement,
    UpdateRejectedError,
    check_dp_event,
    check_withheld_metrics,
)


def _reply(event: dict[str, str | int | float]) -> RecordDict:
    content = RecordDict()
    content.config_records[DP_EVENT_KEY] = ConfigRecord(dict(event))
    return content


def _event(noise: float, rate: float, steps: int) -> RecordDict:
    return _reply(event_to_json(PoissonGaussianEvent(noise, rate, steps)))


EPOCHS = DpRequirement(
    local_steps=0, local_epochs=2.0, batch_size=256, min_noise_multiplier=0.0, max_records=10_000
)


def test_an_epoch_round_accepts_the_steps_of_the_declared_size() -> None:
    # 2,000 records at expected batch 256: q = 0.128, 8 batches per epoch, 2 epochs.
    event = check_dp_event(_event(1.2, 256 / 2000, 16), EPOCHS, "site-a")

    assert event is not None and event["steps"] == 16


def test_an_epoch_round_refuses_steps_that_do_not_match_the_declared_size() -> None:
    with pytest.raises(UpdateRejectedError, match="declares 12 steps; the round asked for 16"):
        check_dp_event(_event(1.2, 256 / 2000, 12), EPOCHS, "site-a")


def test_a_step_round_still_asks_for_its_steps() -> None:
    required = DpRequirement(
        local_steps=5, local_epochs=0.0, batch_size=8, min_noise_multiplier=1.0, max_records=100
    )

    with pytest.raises(UpdateRejectedError, match="declares 6 steps; the round asked for 5"):
        check_dp_event(_event(1.2, 0.5, 6), required, "site-a")


@pytest.mark.parametrize("noise", [1e-300, 1e-3, 0.29, 1e4 * 1.01, 1e200])
def test_a_noise_multiplier_the_accountants_cannot_compose_is_rejected(noise: float) -> None:
    # Under a target epsilon the round sets no minimum; admitted, 1e200 overflowed the RDP
    # accountant and 1e-3 made the PLD accountant ask for 38 GiB, after the round, every round.
    with pytest.raises(UpdateRejectedError, match=r"outside \[0.3, 10000\]"):
        check_dp_event(_event(noise, 256 / 2000, 16), EPOCHS, "site-a")


def test_the_ends_of_the_admitted_noise_range_are_accounted() -> None:
    for noise in (0.3, 1e4):
        event = check_dp_event(_event(noise, 256 / 2000, 16), EPOCHS, "site-a")
        assert event is not None
        epsilon = compute_epsilon([event_from_json(event)], delta=1e-5, accountant="rdp")
        assert math.isfinite(epsilon) and epsilon > 0


def test_a_rate_implying_an_absurd_size_is_rejected_not_raised() -> None:
    content = _reply(
        {"type": "poisson_gaussian", "noise_multiplier": 1.0, "sampling_rate": 1e-300, "steps": 1}
    )

    with pytest.raises(UpdateRejectedError, match="DP event: sampling_rate"):
        check_dp_event(content, EPOCHS, "site-a")


@pytest.mark.parametrize(
    ("local_steps", "local_epochs", "steps_at_10k", "steps_at_20k"),
    [(0, 2.0, 80, 158), (5, 0.0, 5, 5)],
    ids=["epochs", "steps"],
)
def test_a_rate_implying_more_records_than_the_federation_allows_is_rejected(
    local_steps: int, local_epochs: float, steps_at_10k: int, steps_at_20k: int
) -> None:
    # In epochs a site's rate sets the steps composed every round: 8 / 2**53 once admitted
    # 1.1e15 steps, which the PLD accountant failed on (5 TiB) after every later round.
    required = DpRequirement(
        local_steps=local_steps,
        local_epochs=local_epochs,
        batch_size=256,
        min_noise_multiplier=0.0,
        max_records=10_000,
    )

    assert check_dp_event(_event(1.0, 256 / 10_000, steps_at_10k), required, "site-a")
    with pytest.raises(UpdateRejectedError, match="implies 20000 records; the federation allows"):
        check_dp_event(_event(1.0, 256 / 20_000, steps_at_20k), required, "site-a")


def test_a_private_site_claiming_a_large_count_is_rejected() -> None:
    # An honest private site weighs 1; a claimed 1,000,000 would set the global adapter alone.
    with pytest.raises(UpdateRejectedError, match="reports no counts"):
        check_withheld_metrics(
            SiteMetrics(num_examples=1_000_000, train_loss=None, tokens=0, seconds=0.0),
            EPOCHS,
            "site-a",
        )


def test_a_private_site_reporting_its_loss_is_rejected() -> None:
    with pytest.raises(UpdateRejectedError, match="reports no counts"):
        check_withheld_metrics(
            SiteMetrics(num_examples=1, train_loss=0.5, tokens=0, seconds=0.0), EPOCHS, "site-a"
        )


def test_withheld_metrics_pass_and_counts_pass_without_dp() -> None:
    check_withheld_metrics(SiteMetrics.withheld(precision="bf16"), EPOCHS, "site-a")
    check_withheld_metrics(
        SiteMetrics(num_examples=600, train_loss=0.5, tokens=9000, seconds=3.0), None, "site-a"
    )
