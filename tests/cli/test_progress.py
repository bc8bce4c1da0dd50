"""The terminal's before/after table of the gold parts."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from fedsilo.cli.progress import ConsoleReporter


def _record(round_number: int, category: float, low: float, high: float) -> dict[str, Any]:
    return {
        "round": round_number,
        "gold_accuracy": 0.0,
        "gold_category_accuracy": category,
        "gold_loss": 3.0 - round_number,
        "gold_count": 48,
        "gold_category_accuracy_ci95": [low, high],
        "gold_parts": {
            "unseen-code": {
                "count": 48,
                "category_accuracy": category,
                "category_accuracy_ci95": [low, high],
                "accuracy": 0.0,
                "accuracy_ci95": [0.0, 0.0],
            },
            "phrasing": {"count": 30, "category_accuracy": 0.2, "accuracy": 0.1},
            "ranking": {"count": 48, "candidates": 10, "top1": 0.25, "top1_ci95": [0.125, 0.375]},
        },
    }


def test_summary_shows_each_part_with_its_interval() -> None:
    console = Console(record=True, width=80)

    ConsoleReporter(console, metric="code").summary(
        [_record(0, 0.042, 0.0, 0.104), _record(3, 0.5, 0.354, 0.646)]
    )

    text = console.export_text()
    assert "unseen-code" in text and "phrasing" in text and "ranking" in text
    assert "4.2% [0.0-10.4]" in text
    assert "50.0% [35.4-64.6]" in text
    assert "top-1 of 10" in text and "25.0% [12.5-37.5]" in text
    assert text.index("unseen-code") < text.index("phrasing") < text.index("ranking")


def test_summary_of_records_without_parts_shows_the_headline() -> None:
    console = Console(record=True, width=80)
    old = {"round": 0, "gold_accuracy": 0.0, "gold_category_accuracy": 0.25, "gold_loss": 2.0}

    ConsoleReporter(console, metric="code").summary(
        [old, {**old, "round": 1, "gold_category_accuracy": 0.5}]
    )

    text = console.export_text()
    assert "category" in text and "25.0%" in text and "50.0%" in text


def test_round_line_shows_the_headline_interval() -> None:
    console = Console(record=True, width=200)
    record = {**_record(2, 0.5, 0.354, 0.646), "sites_ok": 4, "sites_failed": 0}

    ConsoleReporter(console, metric="code").round_done(
        {**record, "train_loss": 1.0, "seconds": 3.0}, total_rounds=3
    )

    assert "category 50.0% [35.4-64.6]" in console.export_text()


def test_summary_names_the_metric_beside_each_accuracy() -> None:
    console = Console(record=True, width=120)
    record = {"round": 0, "gold_accuracy": 0.25, "gold_category_accuracy": 0.5, "gold_loss": 2.0}

    ConsoleReporter(console, metric="exact").summary([record, {**record, "round": 2}])

    text = console.export_text()
    assert "metric exact" in text
    assert "accuracy (exact)" in text and "mean similarity (exact)" in text
    assert "exact match" not in text and "category" not in text


def test_a_sites_reason_is_printed_as_text_never_as_markup() -> None:
    console = Console(record=True, width=200)
    reporter = ConsoleReporter(console, metric="code")
    record = {
        "round": 1,
        "sites_ok": 1,
        "sites_failed": 1,
        "train_loss": 1.0,
        "seconds": 2.0,
        "failures": {"site-[b]": "site error: [/] [bold red]fake[/]\x1b[2J"},
    }

    reporter.round_done(record, total_rounds=2)  # "[/]" raised MarkupError when read as markup
    reporter.notice("round 1 attempt 1: site-b: [/] closes nothing")

    text = console.export_text()
    assert "site-[b]: site error: [/] [bold red]fake[/]\ufffd[2J" in text
    assert "site-b: [/] closes nothing" in text
