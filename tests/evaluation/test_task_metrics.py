"""Sentiment and next-token gold metrics on hand-made cases."""

from __future__ import annotations

import pytest

from fedsilo.data.icd10_edge import EdgeCaseSet
from fedsilo.data.records import ChatRecord
from fedsilo.evaluation.edge_cases import score_edge_answers
from fedsilo.evaluation.metrics import (
    looks_like_code,
    normalize_label,
    sentiment_adjacent,
    sentiment_match,
    summarize_next_token,
    summarize_sentiment,
)


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Positive.", "positive"),
        ("  negative, clearly", "negative"),
        ("", ""),
        ('"neutral"', "neutral"),
    ],
)
def test_normalize_label(answer: str, expected: str) -> None:
    assert normalize_label(answer) == expected


@pytest.mark.parametrize(
    ("answer", "reference", "exact", "adjacent"),
    [
        ("positive", "positive", True, True),
        ("Neutral.", "positive", False, True),
        ("neutral", "negative", False, True),
        ("negative", "positive", False, False),
        ("great", "positive", False, False),
        ("", "neutral", False, False),
    ],
)
def test_sentiment_match_and_adjacent(
    answer: str, reference: str, exact: bool, adjacent: bool
) -> None:
    assert sentiment_match(answer, reference) is exact
    assert sentiment_adjacent(answer, reference) is adjacent


def test_summarize_sentiment_counts_each_kind() -> None:
    metrics = summarize_sentiment(
        ["positive", "neutral", "negative", "x"],
        ["positive", "positive", "positive", "neutral"],
        [1.0, 2.0, 3.0, 4.0],
    )

    assert (metrics.accuracy, metrics.category_accuracy) == (0.25, 0.5)
    assert metrics.loss == 2.5 and metrics.count == 4


def test_summarize_sentiment_refuses_misaligned_input() -> None:
    with pytest.raises(ValueError, match="same length"):
        summarize_sentiment(["positive"], ["positive", "neutral"], [1.0, 1.0])


def test_summarize_next_token_pools_over_tokens() -> None:
    metrics = summarize_next_token(3, 7, 10, [0.5, 1.5])

    assert (metrics.accuracy, metrics.category_accuracy, metrics.loss, metrics.count) == (
        0.3,
        0.7,
        1.0,
        2,
    )


def test_summarize_next_token_refuses_impossible_counts() -> None:
    with pytest.raises(ValueError, match="top1"):
        summarize_next_token(5, 3, 10, [1.0])


@pytest.mark.parametrize(
    ("answer", "shaped"),
    [("E11.9", True), ("s72.001a", True), ("I10", True), ("OK", False), ("", False), ("E1", False)],
)
def test_looks_like_code(answer: str, shaped: bool) -> None:
    assert looks_like_code(answer) is shaped


def test_edge_scores_per_scoring_kind() -> None:
    coded = EdgeCaseSet("rare-code", "code", (ChatRecord("p", "E11.9"), ChatRecord("q", "I10")))
    shaped = EdgeCaseSet("empty", "code-shaped", (ChatRecord("", ""), ChatRecord(" ", "")))

    coded_score = score_edge_answers(coded, ["E11.65", "I10"])
    shaped_score = score_edge_answers(shaped, ["E11.9", "I do not know"])

    assert (coded_score.accuracy, coded_score.category_accuracy) == (0.5, 1.0)
    assert coded_score.code_shaped_rate == 1.0
    assert coded_score.category_accuracy_ci95 == (1.0, 1.0)
    assert coded_score.accuracy_ci95 is not None
    assert coded_score.accuracy_ci95[0] <= 0.5 <= coded_score.accuracy_ci95[1]
    assert (shaped_score.accuracy, shaped_score.code_shaped_rate) == (None, 0.5)
    with pytest.raises(ValueError, match="answers"):
        score_edge_answers(coded, ["E11.9"])
