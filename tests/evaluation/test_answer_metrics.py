"""Free-text gold answers: whole-answer, label and similarity scores, never the first word."""

import pytest

from fedsilo.evaluation.metrics import (
    METRIC_SCORES,
    RECORD_SCORES,
    RIGHT_OR_WRONG,
    normalize_answer,
    predicted_label,
    summarize,
    summarize_exact,
    summarize_label,
    summarize_similarity,
)

# Short answers that share their first word: the ICD-10 metric would call all of them right.
GOLD = ["Theft; Laptop", "Theft; Paper/Films", "Theft; Laptop", "Hacking/IT Incident; Server"]
ANSWERS = ["Theft; Laptop", "Theft; Laptop", "theft;  laptop.", "Hacking/IT Incident; Email"]
LOSSES = [1.0, 2.0, 3.0, 4.0]


def test_first_word_metric_is_what_overstated_these_answers() -> None:
    assert summarize(ANSWERS, GOLD, LOSSES).accuracy == 1.0


def test_exact_compares_the_whole_normalized_answer() -> None:
    scores = summarize_exact(ANSWERS, GOLD, LOSSES)

    assert scores.accuracy == pytest.approx(2 / 4)
    assert scores.count == 4
    assert 0.5 < scores.category_accuracy < 1.0  # mean similarity: partly right answers
    assert normalize_answer("  Theft;   Laptop. ") == "theft; laptop"


def test_label_maps_an_answer_to_the_gold_answer_it_names() -> None:
    labels = sorted({normalize_answer(g) for g in GOLD})

    assert predicted_label("Theft; Laptop, left in a car", labels) is None  # no whole label
    assert predicted_label("Theft; Laptop stolen", labels) == "theft; laptop"
    assert predicted_label("Unknown", labels) is None
    scores = summarize_label([*ANSWERS[:3], "Unknown"], GOLD, LOSSES)
    assert scores.accuracy == pytest.approx(2 / 4)
    assert scores.category_accuracy == pytest.approx(3 / 4)


def test_similarity_is_one_only_for_identical_answers() -> None:
    same = summarize_similarity(GOLD, GOLD, LOSSES)
    other = summarize_similarity(["xyz"] * 4, GOLD, LOSSES)

    assert same.accuracy == 1.0 and same.category_accuracy == 1.0
    assert 0.0 <= other.accuracy < 0.2 and other.category_accuracy == 0.0


@pytest.mark.parametrize("metric", sorted(RECORD_SCORES))
def test_right_or_wrong_says_which_record_scores_are_zero_or_one(metric: str) -> None:
    # Partly right answers: a fractional score shows wherever a metric has one.
    answers = [*ANSWERS, "E11.9", "E11.65", "5", "4"]
    references = [*GOLD, "E11.9", "E11.9", "5", "5"]

    scores = RECORD_SCORES[metric](answers, references)

    for binary, values in zip(RIGHT_OR_WRONG[metric], scores, strict=True):
        assert set(values) <= {0.0, 1.0} if binary else any(0 < v < 1 for v in values)


def test_right_or_wrong_covers_every_metric() -> None:
    assert set(RIGHT_OR_WRONG) == set(METRIC_SCORES)
