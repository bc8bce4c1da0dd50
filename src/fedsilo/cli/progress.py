"""Round-by-round progress on the terminal."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.table import Table
from rich.text import Text

from fedsilo.evaluation.metrics import SECONDARY_LABELS
from fedsilo.report.reader_text import one_line
from fedsilo.training.loop import StepProgress
from fedsilo.training.progress import progress_to


def _percent(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):5.1f}%"


def _number(value: Any) -> str:
    return "-" if value is None else f"{float(value):.3f}"


def _training_speed(record: dict[str, Any]) -> str:
    """The sites' training time and speed, when they reported it (not under DP)."""
    rate = record.get("train_tokens_per_s")
    if not rate:
        return ""
    return (
        f"  (training {record['train_seconds']:.1f} s at {rate:,.0f} tokens/s, "
        f"{record.get('precision') or '-'})"
    )


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
                f"{self._secondary} {_headline(record)}  "
                f"gold loss {_number(record['gold_loss'])}"
            )
            return
        answered = record["sites_ok"]
        asked = answered + record["sites_failed"]
        gold = (
            f"{self._accuracy(record)}  {self._secondary} {_headline(record)}  "
            f"gold loss {_number(record['gold_loss'])}  "
            if "gold_accuracy" in record
            else ""  # not scored after this round ([evaluation] every_rounds)
        )
        self.console.print(
            f"[bold]round {record['round']}/{total_rounds}[/]  sites {answered}/{asked}  "
            f"train loss {_number(record['train_loss'])}  "
            f"{gold}{record['seconds']:.1f} s"
            f"{_training_speed(record)}"
        )
        # Site names and reasons come from sites: printed as text, never read as rich markup
        # (a reason "[/]" would raise, and end the run, if it were).
        for site, reason in sorted(record.get("failures", {}).items()):
            self.console.print(Text.assemble("    ", (site, "yellow"), ": ", one_line(reason)))

    def notice(self, text: str) -> None:
        """``text`` in yellow, as it is: it may quote a site's words."""
        self.console.print(Text(text, style="yellow"))

    @contextmanager
    def training_progress(self) -> Iterator[None]:
        """A live bar per site while it trains: its name, step of steps, tokens/s.

        Sites that train side by side (run.concurrent_sites) report from their own threads:
        each has its bar, removed when its round's last step is done.
        """
        bar = Progress(
            TextColumn("  site {task.fields[site]} training"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps  {task.fields[rate]}"),
            console=self.console,
            transient=True,
        )
        current: dict[str, TaskID] = {}
        lock = threading.Lock()

        def show(site: str, progress: StepProgress) -> None:
            with lock:
                if progress.step == 1 and site in current:  # a stale bar from a failed round
                    bar.remove_task(current.pop(site))
                if site not in current:
                    current[site] = bar.add_task("", total=progress.steps, site=site, rate="")
                bar.update(
                    current[site],
                    completed=progress.step,
                    rate=f"{progress.tokens_per_second:,.0f} tokens/s",
                )
                if progress.step >= progress.steps:
                    bar.remove_task(current.pop(site))

        with bar, progress_to(show):
            yield

    def summary(self, records: list[dict[str, Any]]) -> None:
        """Before/after table of every gold part, each figure with its 95% interval and each
        accuracy with the metric that scored it."""
        if not records:
            return
        first, last = records[0], records[-1]
        table = Table(
            title=f"Gold set (held out from every site), metric {self.metric}, 95% intervals"
        )
        table.add_column("part", no_wrap=True)
        table.add_column("metric", no_wrap=True)
        table.add_column("n", justify="right")
        table.add_column(f"round {first['round']}", justify="right")
        table.add_column(f"round {last['round']}", justify="right")
        parts_before, parts_after = _parts(first), _parts(last)
        for part, after in parts_after.items():
            before = parts_before.get(part, {})
            for key, label in PART_METRICS:
                if key not in after:
                    continue
                label = label.format(
                    k=after.get("candidates", "?"),
                    metric=self.metric,
                    secondary=self._secondary,
                )
                table.add_row(
                    part,
                    label,
                    str(after.get("count", "-")),
                    _with_interval(before, key),
                    _with_interval(after, key),
                )
        table.add_row("", "mean loss", "", _number(first["gold_loss"]), _number(last["gold_loss"]))
        self.console.print(table)


# The figures a part may have, in table order, with their labels: the two accuracies carry the
# run's metric (what they count is the metric's, as on the round lines); {k}: candidates offered.
PART_METRICS: tuple[tuple[str, str], ...] = (
    ("category_accuracy", "{secondary} ({metric})"),
    ("accuracy", "accuracy ({metric})"),
    ("top1", "top-1 of {k}"),
    ("top5", "top-5 of {k}"),
)


def _parts(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The record's gold parts; a record from before parts existed has its headline only."""
    parts = record.get("gold_parts")
    if parts:
        return dict(parts)
    return {
        "gold": {
            "count": record.get("gold_count", "-"),
            "category_accuracy": record["gold_category_accuracy"],
            "accuracy": record["gold_accuracy"],
        }
    }


def _headline(record: dict[str, Any]) -> str:
    """The headline category accuracy, with its interval when the record has one."""
    figures = {
        "category_accuracy": record["gold_category_accuracy"],
        "category_accuracy_ci95": record.get("gold_category_accuracy_ci95"),
    }
    return _with_interval(figures, "category_accuracy")


def _with_interval(figures: dict[str, Any], key: str) -> str:
    if key not in figures:
        return "-"
    interval = figures.get(f"{key}_ci95")
    if not interval:
        return _percent(figures[key])
    low, high = interval
    return f"{_percent(figures[key]).strip()} [{100 * low:.1f}-{100 * high:.1f}]"
