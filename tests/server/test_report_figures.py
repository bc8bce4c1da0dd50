"""The report's figures: example counts only where sent, ranking chance, interval caveats."""

from __future__ import annotations

from typing import Any

import pytest

from fedsilo.ledger import Entry, EntryKind
from fedsilo.report.model import PartRow, RoundRow
from fedsilo.server.report_figures import (
    gold_parts_of,
    interval_caveats,
    ranking_chance,
    round_examples,
)

_EVENT = {"type": "poisson_gaussian", "noise_multiplier": 1.0, "sampling_rate": 0.1, "steps": 1}


def _entry(seq: int, kind: EntryKind, payload: dict[str, Any]) -> Entry:
    return Entry(seq, kind, "2024-01-01T00:00:00.000000Z", payload, "", "", "")


def _round(*updates: dict[str, Any], secure: str = "none", examples: int = 2) -> list[Entry]:
    sites = [str(update["site_id"]) for update in updates]
    return [
        _entry(1, EntryKind.RUN_STARTED, {"secure_aggregation": secure}),
        *(
            _entry(2 + i, EntryKind.UPDATE_RECEIVED, {"round": 1, **update})
            for i, update in enumerate(updates)
        ),
        _entry(9, EntryKind.ROUND_AGGREGATED, {"round": 1, "sites": sites, "examples": examples}),
    ]


def test_counts_every_summed_site_sent_are_shown() -> None:
    entries = _round(
        {"site_id": "a", "num_examples": 40, "dp_event": None},
        {"site_id": "b", "num_examples": 60, "dp_event": None},
        examples=100,
    )

    assert round_examples(entries) == {1: (100, None)}


def test_the_total_is_the_sites_signed_counts_not_the_coordinators_own() -> None:
    entries = _round(
        {"site_id": "a", "num_examples": 40, "dp_event": None},
        {"site_id": "b", "num_examples": 60, "dp_event": None},
        examples=1_000_000,
    )

    assert round_examples(entries) == {1: (100, None)}


def test_placeholder_counts_under_record_level_dp_are_withheld() -> None:
    entries = _round(
        {"site_id": "a", "num_examples": 1, "dp_event": _EVENT},
        {"site_id": "b", "num_examples": 1, "dp_event": _EVENT},
    )

    assert round_examples(entries) == {1: (None, "withheld (record-level DP)")}


def test_no_count_is_shown_under_secure_aggregation() -> None:
    entries = _round({"site_id": "a"}, {"site_id": "b"}, secure="secagg")

    assert round_examples(entries) == {1: (None, "withheld (secure aggregation)")}


def test_a_summed_site_without_a_recorded_count_leaves_the_total_unknown() -> None:
    entries = _round({"site_id": "a", "num_examples": 40, "dp_event": None}, {"site_id": "b"})

    assert round_examples(entries) == {1: (None, None)}


@pytest.mark.parametrize(
    ("figure", "candidates", "expected"),
    [
        ("top1", 10, (10, 0.1)),
        ("top5", 10, (10, 0.5)),
        ("top5", 3, (3, 1.0)),
        ("accuracy", 10, (None, None)),
        ("top1", None, (None, None)),
        ("top1", True, (None, None)),
    ],
)
def test_ranking_chance(figure: str, candidates: object, expected: tuple[object, object]) -> None:
    assert ranking_chance(figure, candidates) == expected


def test_gold_parts_carry_the_ranking_candidates_recorded_with_them() -> None:
    ranking = {"candidates": 10, "count": 200, "top1": 0.785, "top5": 0.995}
    unseen = {"count": 200, "accuracy": 0.12, "category_accuracy": 0.6}
    record = {"round": 1, "gold_parts": {"ranking": ranking, "unseen-code": unseen}}

    parts = {(p.part, p.figure): p for p in gold_parts_of(record)}

    assert (parts["ranking", "top1"].candidates, parts["ranking", "top1"].chance) == (10, 0.1)
    assert (parts["ranking", "top5"].candidates, parts["ranking", "top5"].chance) == (10, 0.5)
    assert parts["unseen-code", "accuracy"].candidates is None


def _row(round_number: int, value: float, interval: tuple[float, float]) -> RoundRow:
    return RoundRow(round_number, 2, 0, (), None, None, 0.0, value, 1.0, 200, "ab" * 32, interval)


def test_no_caveat_where_no_interval_collapsed() -> None:
    rows = [_row(0, 0.05, (0.02, 0.08))]

    assert interval_caveats(rows, [], metric="code", secondary="category") == ()


def test_zero_of_n_gives_the_exact_upper_bounds_and_names_every_place() -> None:
    rows = [_row(0, 0.0, (0.0, 0.0)), _row(7, 0.005, (0.0, 0.015)), _row(28, 0.0, (0.0, 0.0))]
    parts = [PartRow("unseen-code", "accuracy", 0.0, (0.0, 0.0), 200)]

    (caveat,) = interval_caveats(rows, parts, metric="code", secondary="category")

    assert caveat.startswith(
        "the rounds table's category after rounds 0, 28; unseen-code accuracy after the last "
        "round: "
        "0 of 200 records right"
    )
    assert "the exact one-sided 95% upper bound is 1.49%" in caveat
    assert "Clopper-Pearson interval is 0% to 1.83%" in caveat


def test_n_of_n_gives_the_exact_lower_bounds() -> None:
    parts = [PartRow("ranking", "top5", 1.0, (1.0, 1.0), 200, candidates=10, chance=0.5)]

    (caveat,) = interval_caveats([], parts, metric="code", secondary="category")

    assert "200 of 200 records right" in caveat
    assert "one-sided 95% lower bound is 98.51%" in caveat
    assert "interval is 98.17% to 100%" in caveat


def test_a_figure_that_is_not_a_share_of_right_records_gets_no_binomial_bound() -> None:
    parts = [PartRow("gold", "accuracy", 0.0, (0.0, 0.0), 50)]

    (caveat,) = interval_caveats([], parts, metric="similarity", secondary="similarity >= 0.9")

    assert "is a point, which understates the uncertainty" in caveat
    assert "no exact binomial bound is given" in caveat
    assert "Clopper" not in caveat
