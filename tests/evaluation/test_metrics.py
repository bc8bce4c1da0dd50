"""Gold-set metrics on hand-made answers."""

from __future__ import annotations

import math

import pytest

from fedsilo.evaluation.metrics import (
    GoldMetrics,
    code_category_match,
    code_exact_match,
    normalize_code,
    summarize,
)


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("E11.9", "E11.9"),
        (" e11.9.", "E11.9"),
        ("", ""),
        ("   \n", ""),
        ('"I10"', "I10"),
        ("**I10**, essential hypertension", "I10"),
        ("E11.9 Type 2 diabetes", "E11.9"),
        ("\u201cM54.5\u201d", "M54.5"),
        ("(J45.909)", "J45.909"),
        ("\nS72.001A\n", "S72.001A"),
    ],
)
def test_normalize_code(answer: str, expected: str) -> None:
    assert normalize_code(answer) == expected


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [
        ("E11.9", "E11.9"),
        ("e11.9", "E11.9"),
        ("E11.9.", "E11.9"),
        ("E11.9 (type 2 diabetes)", "E11.9"),
        ("E119", "E11.9"),  # the dot is formatting
    ],
)
def test_exact_match_accepts(prediction: str, reference: str) -> None:
    assert code_exact_match(prediction, reference)


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [
        ("", "E11.9"),
        ("E11.65", "E11.9"),
        ("E11", "E11.9"),
        ("The code is E11.9", "E11.9"),
        ("E11.9", ""),
    ],
)
def test_exact_match_rejects(prediction: str, reference: str) -> None:
    assert not code_exact_match(prediction, reference)


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [
        ("E11.65", "E11.9"),
        ("e11", "E11.9"),
        ("E119", "E11.9"),
        ("E11.9.", "E11.9"),
    ],
)
def test_category_match_accepts(prediction: str, reference: str) -> None:
    assert code_category_match(prediction, reference)


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [
        ("", "E11.9"),
        ("E1", "E11.9"),
        ("E10.9", "E11.9"),
        ("I10", "E11.9"),
        ("11.9", "E11.9"),
    ],
)
def test_category_match_rejects(prediction: str, reference: str) -> None:
    assert not code_category_match(prediction, reference)


def test_summarize_counts_exact_and_category_hits() -> None:
    predictions = ["E11.9", "e11.65", "I10", ""]
    references = ["E11.9", "E11.9", "J45.909", "M54.5"]

    metrics = summarize(predictions, references, [1.0, 2.0, 3.0, 6.0])

    assert metrics == GoldMetrics(accuracy=0.25, category_accuracy=0.5, loss=3.0, count=4)


def test_summarize_loss_is_the_mean_of_example_losses() -> None:
    metrics = summarize(["A"] * 3, ["B"] * 3, [0.1, 0.2, 0.6])

    assert math.isclose(metrics.loss, 0.3)


def test_summarize_rejects_empty_gold_set() -> None:
    with pytest.raises(ValueError, match="empty"):
        summarize([], [], [])


@pytest.mark.parametrize(
    ("predictions", "losses"),
    [(["E11.9"], [1.0, 2.0]), (["E11.9", "I10"], [1.0])],
)
def test_summarize_rejects_length_mismatch(predictions: list[str], losses: list[float]) -> None:
    with pytest.raises(ValueError, match="same length"):
        summarize(predictions, ["E11.9", "I10"], losses)


def test_summarize_rejects_non_finite_loss_and_names_the_example() -> None:
    with pytest.raises(ValueError, match="example 1"):
        summarize(["E11.9", "I10"], ["E11.9", "I10"], [1.0, math.nan])
