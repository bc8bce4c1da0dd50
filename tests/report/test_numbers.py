"""Numbers a report reads from a run folder: a crafted one is left out, never a traceback."""

from __future__ import annotations

import math

import pytest

from fedsilo.report.numbers import recorded_float
from fedsilo.server.report_figures import float_pair, gold_parts_of


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0.25, 0.25), (3, 3.0), (-1, -1.0), (10**300, 1e300)],
)
def test_a_finite_number_is_read_as_a_float(value: object, expected: float) -> None:
    assert recorded_float(value) == expected


@pytest.mark.parametrize(
    "value", [10**400, -(10**400), math.nan, math.inf, True, "0.5", None, [0.5]]
)
def test_anything_else_is_not_a_number(value: object) -> None:
    assert recorded_float(value) is None


def test_a_figure_no_float_can_hold_is_left_out_of_the_gold_parts() -> None:
    record = {
        "gold_parts": {
            "unseen-code": {
                "count": 200,
                "accuracy": 10**400,
                "category_accuracy": 0.5,
                "category_accuracy_ci95": [0.4, 10**400],
            }
        }
    }

    (row,) = gold_parts_of(record)

    assert (row.figure, row.value, row.ci95) == ("category accuracy", 0.5, None)
    assert float_pair([0.4, 0.6]) == (0.4, 0.6)
