"""Scores for generated answers against the gold answers: pure functions of strings.

ICD-10-CM codes (``code``), rating classes (``sentiment``), and free-text answers: the whole
normalized answer (``exact``, the default for a task of files), classification over the gold
answers (``label``) and character similarity (``similarity``).

A generated answer is reduced to a code by ``normalize_code`` (first word, upper case, outer
punctuation dropped). Codes are then compared without their dot: the dot in "E11.9" is
formatting (ICD-10-CM data files store "E119"), so a model that writes "E119" has named the
right diagnosis and counts as correct.
"""

from __future__ import annotations

import difflib
import math
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

# ASCII punctuation plus the typographic quotes a chat model may wrap an answer in.
_OUTER_PUNCTUATION = string.punctuation + "\u2018\u2019\u201c\u201d\u00ab\u00bb"

CATEGORY_LENGTH = 3  # an ICD-10-CM category is the first three characters, e.g. "E11"


def normalize_code(text: str) -> str:
    """The code a generated answer names: its first word, upper-cased, outer punctuation gone.

    The dot inside the code is kept: ``" e11.9."`` gives ``"E11.9"``, ``"**I10**, essential
    hypertension"`` gives ``"I10"``, and an empty or blank answer gives ``""``.
    """
    words = text.split()
    if not words:
        return ""
    return words[0].strip(_OUTER_PUNCTUATION).upper()


def _bare_code(text: str) -> str:
    return normalize_code(text).replace(".", "")


def code_exact_match(prediction: str, reference: str) -> bool:
    """True if both name the same code, ignoring case, outer punctuation and the dot.

    An empty prediction never matches (nor does anything match an empty reference).
    """
    predicted, expected = _bare_code(prediction), _bare_code(reference)
    return bool(predicted) and predicted == expected


def code_category_match(prediction: str, reference: str) -> bool:
    """True if both codes share their 3-character category ("E11.65" and "E11.9" do).

    A prediction shorter than a category, or empty, never matches.
    """
    predicted, expected = _bare_code(prediction), _bare_code(reference)
    if len(predicted) < CATEGORY_LENGTH or len(expected) < CATEGORY_LENGTH:
        return False
    return predicted[:CATEGORY_LENGTH] == expected[:CATEGORY_LENGTH]


PartMetrics = dict[str, float | int | list[float]]
"""One gold part's figures by name, e.g. {"count": 200, "category_accuracy": 0.41,
"category_accuracy_ci95": [0.34, 0.48]}."""


@dataclass(frozen=True)
class GoldMetrics:
    """Scores of one model on the gold set.

    ``accuracy`` and ``category_accuracy`` are fractions in [0, 1] of ``count`` examples;
    ``loss`` is the mean over examples of each example's reference-answer loss. The intervals
    are 95% percentile-bootstrap intervals over the records (None where not computed), and
    ``parts`` holds every gold part's figures, the headline part included, by part name.
    """

    accuracy: float
    category_accuracy: float
    loss: float
    count: int
    accuracy_ci95: tuple[float, float] | None = None
    category_accuracy_ci95: tuple[float, float] | None = None
    parts: Mapping[str, PartMetrics] = field(default_factory=dict)

    def part(self) -> PartMetrics:
        """These figures as one part of the gold standard."""
        figures: PartMetrics = {
            "count": self.count,
            "accuracy": self.accuracy,
            "category_accuracy": self.category_accuracy,
            "loss": self.loss,
        }
        if self.accuracy_ci95 is not None:
            figures["accuracy_ci95"] = list(self.accuracy_ci95)
        if self.category_accuracy_ci95 is not None:
            figures["category_accuracy_ci95"] = list(self.category_accuracy_ci95)
        return figures


def summarize(
    predictions: Sequence[str], references: Sequence[str], losses: Sequence[float]
) -> GoldMetrics:
    """Exact-match and category accuracy of ``predictions``, and the mean of ``losses``.

    The three sequences are aligned (item i of each is about gold example i); a length
    mismatch or an empty gold set raises ``ValueError``, as does a non-finite loss, which
    would otherwise turn the reported mean into NaN or infinity without saying which example
    caused it.
    """
    count = len(references)
    if count == 0:
        raise ValueError("cannot summarize an empty gold set")
    if len(predictions) != count or len(losses) != count:
        raise ValueError(
            f"predictions, references and losses must have the same length, got "
            f"{len(predictions)}, {count} and {len(losses)}"
        )
    for position, loss in enumerate(losses):
        if not math.isfinite(loss):
            raise ValueError(f"loss of gold example {position} is not finite: {loss}")
    exact = sum(code_exact_match(p, r) for p, r in zip(predictions, references, strict=True))
    category = sum(code_category_match(p, r) for p, r in zip(predictions, references, strict=True))
    return GoldMetrics(
        accuracy=exact / count,
        category_accuracy=category / count,
        loss=math.fsum(losses) / count,
        count=count,
    )


SENTIMENT_LABELS: tuple[str, ...] = ("negative", "neutral", "positive")  # in rating order


def normalize_label(text: str) -> str:
    """The label a generated answer names: its first word, lower-cased, punctuation gone."""
    words = text.split()
    return words[0].strip(_OUTER_PUNCTUATION).lower() if words else ""


def sentiment_match(prediction: str, reference: str) -> bool:
    """True if the answer names the reference rating class (case and punctuation ignored)."""
    predicted = normalize_label(prediction)
    return predicted in SENTIMENT_LABELS and predicted == normalize_label(reference)


def sentiment_adjacent(prediction: str, reference: str) -> bool:
    """True if the answer is a rating class at most one step from the reference.

    Classes are ordered negative < neutral < positive, so only naming the opposite polarity
    (or no class at all) fails: the lenient score for a 3-class ordinal rating.
    """
    predicted, expected = normalize_label(prediction), normalize_label(reference)
    if predicted not in SENTIMENT_LABELS or expected not in SENTIMENT_LABELS:
        return False
    return abs(SENTIMENT_LABELS.index(predicted) - SENTIMENT_LABELS.index(expected)) <= 1


def summarize_sentiment(
    predictions: Sequence[str], references: Sequence[str], losses: Sequence[float]
) -> GoldMetrics:
    """Rating-class accuracy (``accuracy``) and adjacent-class accuracy (``category_accuracy``)."""
    _check_aligned(predictions, references, losses)
    count = len(references)
    pairs = list(zip(predictions, references, strict=True))
    return GoldMetrics(
        accuracy=sum(sentiment_match(p, r) for p, r in pairs) / count,
        category_accuracy=sum(sentiment_adjacent(p, r) for p, r in pairs) / count,
        loss=math.fsum(losses) / count,
        count=count,
    )


def summarize_next_token(
    top1_hits: int, top5_hits: int, tokens: int, losses: Sequence[float]
) -> GoldMetrics:
    """Teacher-forced next-token accuracy over all reference tokens of the gold set.

    ``accuracy`` is top-1 hits / tokens, ``category_accuracy`` top-5 hits / tokens (pooled over
    tokens, as LEAF pools characters), ``loss`` the mean of the per-example losses.
    """
    if not losses or tokens <= 0:
        raise ValueError("cannot summarize an empty gold set")
    if not 0 <= top1_hits <= top5_hits <= tokens:
        raise ValueError(f"need 0 <= top1 ({top1_hits}) <= top5 ({top5_hits}) <= tokens ({tokens})")
    _check_finite(losses)
    return GoldMetrics(
        accuracy=top1_hits / tokens,
        category_accuracy=top5_hits / tokens,
        loss=math.fsum(losses) / len(losses),
        count=len(losses),
    )


def _check_finite(losses: Sequence[float]) -> None:
    for position, loss in enumerate(losses):
        if not math.isfinite(loss):
            raise ValueError(f"loss of gold example {position} is not finite: {loss}")


def _check_aligned(
    predictions: Sequence[str], references: Sequence[str], losses: Sequence[float]
) -> None:
    count = len(references)
    if count == 0:
        raise ValueError("cannot summarize an empty gold set")
    if len(predictions) != count or len(losses) != count:
        raise ValueError(
            f"predictions, references and losses must have the same length, got "
            f"{len(predictions)}, {count} and {len(losses)}"
        )
    _check_finite(losses)


# A letter, a digit, a digit or letter, then optionally a dot and 1-4 more: E11.9, S72.001A.
_CODE_SHAPE = re.compile(r"^[A-Z][0-9][0-9A-Z](\.[0-9A-Z]{1,4})?$")


def looks_like_code(text: str) -> bool:
    """True if the answer's first word has the shape of an ICD-10-CM code (valid or not)."""
    return bool(_CODE_SHAPE.match(normalize_code(text)))


def is_icd10_answer(text: str) -> bool:
    """True if the whole answer is one word shaped like an ICD-10-CM code ("E11.9", "I10")."""
    return len(text.split()) == 1 and looks_like_code(text)


def normalize_answer(text: str) -> str:
    """A free-text answer for whole-answer comparison: case-folded, runs of white space made
    one space, surrounding white space and punctuation dropped (inner punctuation is kept:
    "Theft; Laptop" and "theft; laptop." are the same answer, "Theft" is not)."""
    return " ".join(text.split()).strip(_OUTER_PUNCTUATION + " ").casefold()


def answer_similarity(prediction: str, reference: str) -> float:
    """Character-level similarity in [0, 1] of two normalized answers (difflib's ratio)."""
    return difflib.SequenceMatcher(
        None, normalize_answer(prediction), normalize_answer(reference), autojunk=False
    ).ratio()


def summarize_exact(
    predictions: Sequence[str], references: Sequence[str], losses: Sequence[float]
) -> GoldMetrics:
    """Whole-answer exact match (``accuracy``), mean similarity (``category_accuracy``)."""
    _check_aligned(predictions, references, losses)
    pairs = list(zip(predictions, references, strict=True))
    count = len(pairs)
    return GoldMetrics(
        accuracy=sum(normalize_answer(p) == normalize_answer(r) for p, r in pairs) / count,
        category_accuracy=math.fsum(answer_similarity(p, r) for p, r in pairs) / count,
        loss=math.fsum(losses) / count,
        count=count,
    )


def predicted_label(prediction: str, labels: Sequence[str]) -> str | None:
    """The label (normalized) an answer names: the longest label the answer starts with."""
    answer = normalize_answer(prediction)
    named = [label for label in labels if answer == label or answer.startswith(label + " ")]
    return max(named, key=len) if named else None


def summarize_label(
    predictions: Sequence[str], references: Sequence[str], losses: Sequence[float]
) -> GoldMetrics:
    """Classification over the answers the gold set holds.

    Each answer is mapped to the longest gold answer (normalized) it starts with;
    ``accuracy`` is the fraction mapped to their own gold answer, ``category_accuracy`` the
    fraction that names any of the labels at all.
    """
    _check_aligned(predictions, references, losses)
    labels = sorted({normalize_answer(r) for r in references})
    named = [predicted_label(p, labels) for p in predictions]
    count = len(references)
    return GoldMetrics(
        accuracy=sum(n == normalize_answer(r) for n, r in zip(named, references, strict=True))
        / count,
        category_accuracy=sum(n is not None for n in named) / count,
        loss=math.fsum(losses) / count,
        count=count,
    )


SIMILAR_ENOUGH = 0.9


def summarize_similarity(
    predictions: Sequence[str], references: Sequence[str], losses: Sequence[float]
) -> GoldMetrics:
    """Mean answer similarity (``accuracy``) and the fraction at least ``SIMILAR_ENOUGH``
    similar (``category_accuracy``), for free-text answers."""
    _check_aligned(predictions, references, losses)
    scores = [answer_similarity(p, r) for p, r in zip(predictions, references, strict=True)]
    count = len(scores)
    return GoldMetrics(
        accuracy=math.fsum(scores) / count,
        category_accuracy=sum(s >= SIMILAR_ENOUGH for s in scores) / count,
        loss=math.fsum(losses) / count,
        count=count,
    )


TEXT_SUMMARIES: dict[
    str, Callable[[Sequence[str], Sequence[str], Sequence[float]], GoldMetrics]
] = {
    "code": summarize,
    "sentiment": summarize_sentiment,
    "exact": summarize_exact,
    "label": summarize_label,
    "similarity": summarize_similarity,
}
"""How generated answers are scored, by metric name ("next-token" scores without generating)."""


def _code_scores(answers: Sequence[str], references: Sequence[str]) -> RecordScores:
    pairs = list(zip(answers, references, strict=True))
    return (
        [float(code_exact_match(a, r)) for a, r in pairs],
        [float(code_category_match(a, r)) for a, r in pairs],
    )


def _sentiment_scores(answers: Sequence[str], references: Sequence[str]) -> RecordScores:
    pairs = list(zip(answers, references, strict=True))
    return (
        [float(sentiment_match(a, r)) for a, r in pairs],
        [float(sentiment_adjacent(a, r)) for a, r in pairs],
    )


def _exact_scores(answers: Sequence[str], references: Sequence[str]) -> RecordScores:
    pairs = list(zip(answers, references, strict=True))
    return (
        [float(normalize_answer(a) == normalize_answer(r)) for a, r in pairs],
        [answer_similarity(a, r) for a, r in pairs],
    )


def _label_scores(answers: Sequence[str], references: Sequence[str]) -> RecordScores:
    labels = sorted({normalize_answer(r) for r in references})
    named = [predicted_label(a, labels) for a in answers]
    return (
        [float(n == normalize_answer(r)) for n, r in zip(named, references, strict=True)],
        [float(n is not None) for n in named],
    )


def _similarity_scores(answers: Sequence[str], references: Sequence[str]) -> RecordScores:
    scores = [answer_similarity(a, r) for a, r in zip(answers, references, strict=True)]
    return scores, [float(score >= SIMILAR_ENOUGH) for score in scores]


RecordScores = tuple[list[float], list[float]]

RECORD_SCORES: dict[str, Callable[[Sequence[str], Sequence[str]], RecordScores]] = {
    "code": _code_scores,
    "sentiment": _sentiment_scores,
    "exact": _exact_scores,
    "label": _label_scores,
    "similarity": _similarity_scores,
}
"""Per generated answer, its ``accuracy`` and ``category_accuracy`` scores (their means are the
summaries' figures): what the bootstrap intervals resample."""

METRIC_SCORES: dict[str, tuple[str, str]] = {
    "code": ("exact ICD-10-CM code (first word, dot ignored)", "same 3-character category"),
    "sentiment": ("rating class", "rating class at most one step away"),
    "next-token": ("teacher-forced top-1 next-token accuracy", "top-5 next-token accuracy"),
    "exact": ("whole answer equal to the gold answer (normalized)", "mean answer similarity"),
    "label": ("names its own gold answer among the gold set's answers", "names any of them"),
    "similarity": ("mean answer similarity (difflib ratio)", f"similarity >= {SIMILAR_ENOUGH}"),
}
"""Per metric: what ``gold_accuracy`` and ``gold_category_accuracy`` measure."""

SECONDARY_LABELS: dict[str, str] = {
    "code": "category",
    "sentiment": "adjacent class",
    "next-token": "top-5",
    "exact": "mean similarity",
    "label": "names a label",
    "similarity": f"similarity >= {SIMILAR_ENOUGH}",
}
"""A short name for what ``gold_category_accuracy`` holds under each metric."""

RIGHT_OR_WRONG: dict[str, tuple[bool, bool]] = {
    "code": (True, True),
    "sentiment": (True, True),
    "exact": (True, False),
    "label": (True, True),
    "similarity": (False, True),
    "next-token": (False, False),
}
"""Per metric: whether each gold record scores 0 or 1 on the accuracy and on the secondary
score (their figures are then shares of right records, which exact binomial bounds apply to).
A similarity is a fraction per record; next-token figures pool tokens across records."""
