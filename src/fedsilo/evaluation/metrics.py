"""Scores for generated ICD-10-CM codes against the gold answers: pure functions of strings.

A generated answer is reduced to a code by ``normalize_code`` (first word, upper case, outer
punctuation dropped). Codes are then compared without their dot: the dot in "E11.9" is
formatting (ICD-10-CM data files store "E119"), so a model that writes "E119" has named the
right diagnosis and counts as correct.
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class GoldMetrics:
    """Scores of one model on the gold set.

    ``accuracy`` and ``category_accuracy`` are fractions in [0, 1] of ``count`` examples;
    ``loss`` is the mean over examples of each example's reference-answer loss.
    """

    accuracy: float
    category_accuracy: float
    loss: float
    count: int


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
