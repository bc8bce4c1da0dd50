"""Scores for generated ICD-10-CM codes against the gold answers: pure functions of strings.

A generated answer is reduced to a code by ``normalize_code`` (first word, upper case, outer
punctuation dropped). Codes are then compared without their dot: the dot in "E11.9" is
formatting (ICD-10-CM data files store "E119"), so a model that writes "E119" has named the
right diagnosis and counts as correct.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Mapping, Sequence
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
