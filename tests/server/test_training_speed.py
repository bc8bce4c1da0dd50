"""A round's training figures from the sites' reports: sums, speed, padding and precision."""

from __future__ import annotations

import pytest

from fedsilo.protocol.records import SiteMetrics
from fedsilo.server.federation import _training_speed
from fedsilo.server.rounds import RoundReplies


def _metrics(tokens: int, seconds: float, padding: float | None) -> SiteMetrics:
    return SiteMetrics(
        num_examples=10,
        train_loss=1.0,
        tokens=tokens,
        seconds=seconds,
        precision="bf16",
        padding_share=padding,
    )


def test_padding_is_the_sites_shares_weighted_by_their_tokens() -> None:
    # A packed site computes fewer positions than its tokens (a shared prefix once), so its
    # positions cannot be recovered as tokens / (1 - share): shares are weighted by tokens.
    replies = RoundReplies(
        metrics={
            "a": _metrics(3000, 2.0, 0.0),
            "b": _metrics(1000, 2.0, 0.2),
            "private": SiteMetrics.withheld(precision="bf16"),
        }
    )

    speed = _training_speed(replies)

    assert speed["tokens"] == 4000
    assert speed["train_seconds"] == 4.0
    assert speed["train_tokens_per_s"] == 1000.0
    assert speed["padding_share"] == pytest.approx(0.05)
    assert speed["precision"] == "bf16"


def test_no_padding_figure_without_a_reporting_site() -> None:
    replies = RoundReplies(metrics={"private": SiteMetrics.withheld(precision="fp32")})

    speed = _training_speed(replies)

    assert speed["tokens"] is None and speed["padding_share"] is None
