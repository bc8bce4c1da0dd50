"""Round-by-round progress on the terminal."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from fedsilo.evaluation.metrics import SECONDARY_LABELS


def _percent(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):5.1f}%"


def _number(value: Any) -> str:
    return "-" if value is None else f"{float(value):.3f}"


class ConsoleReporter:
    """Prints one line per round: sites answered, train loss, gold metrics, time."""

    def __init__(self, console: Console | None = None, *, metric: str) -> None:
        self.console = console or Console(highlight=False)
        self.metric = metric  # named beside every accuracy: what it counts is the metric's
        self._secondary = SECONDARY_LABELS.get(metric, "secondary")

    def _accuracy(self, record: dict[str, Any]) -> str:
        count = record.get("gold_count")
        of = f", n={count}" if count is not None else ""
        return f"gold accuracy {_percent(record['gold_accuracy'])} ({self.metric}{of})"

    def round_done(self, record: dict[str, Any], *, total_rounds: int) -> None:
        if record["round"] == 0:
            self.console.print(
                f"[bold]before training[/]  {self._accuracy(record)}  "
                f"{self._secondary} {_percent(record['gold_category_accuracy'])}  "
                f"gold loss {_number(record['gold_loss'])}"
            )
            return
        answered = record["sites_ok"]
        asked = answered + record["sites_failed"]
        self.console.print(
            f"[bold]round {record['round']}/{total_rounds}[/]  sites {answered}/{asked}  "
            f"train loss {_number(record['train_loss'])}  "
            f"{self._accuracy(record)}  "
            f"{self._secondary} {_percent(record['gold_category_accuracy'])}  "
            f"gold loss {_number(record['gold_loss'])}  {record['seconds']:.1f} s"
        )
        for site, reason in sorted(record.get("failures", {}).items()):
            self.console.print(f"    [yellow]{site}[/]: {reason.splitlines()[0]}")

    def notice(self, text: str) -> None:
        self.console.print(f"[yellow]{text}[/]")

    def summary(self, records: list[dict[str, Any]]) -> None:
        """Before/after table of the gold metrics."""
        if not records:
            return
        first, last = records[0], records[-1]
        table = Table(title="Gold set (held out from every site)")
        table.add_column("metric")
        table.add_column(f"round {first['round']}", justify="right")
        table.add_column(f"round {last['round']}", justify="right")
        table.add_row(
            "exact-match accuracy",
            _percent(first["gold_accuracy"]),
            _percent(last["gold_accuracy"]),
        )
        table.add_row(
            "category accuracy",
            _percent(first["gold_category_accuracy"]),
            _percent(last["gold_category_accuracy"]),
        )
        table.add_row("mean loss", _number(first["gold_loss"]), _number(last["gold_loss"]))
        self.console.print(table)
