"""Scoring a model on the held-out gold set."""

from fedsilo.evaluation.metrics import (
    GoldMetrics,
    code_category_match,
    code_exact_match,
    normalize_code,
    summarize,
)

__all__ = [
    "GoldMetrics",
    "code_category_match",
    "code_exact_match",
    "normalize_code",
    "summarize",
]
