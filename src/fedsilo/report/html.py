"""The compliance report as one self-contained HTML page, for reading offline or on paper.

The page is rendered by jinja2 from ``templates/report.html.j2`` with autoescaping on: every
string taken from the data is escaped (site names and rejection reasons come from other
parties), and characters that could disguise text (controls, bidirectional overrides) are
shown as U+FFFD. The page loads nothing: CSS is inline, charts are inline SVG, there is no
script, and a Content-Security-Policy forbids every fetch in case anything slipped in.
"""

from __future__ import annotations

import math
from pathlib import Path

import jinja2
from markupsafe import Markup

from fedsilo.report.model import ReportData, RoundRow
from fedsilo.report.reader_text import EPSILON_OF_ACCEPTED_UPDATES_ONLY
from fedsilo.report.svg import UNSAFE_CHARS, line_chart
from fedsilo.storage import write_text_atomic

_MISSING = "\u2014"  # em dash: a value that does not exist, as opposed to zero


def _finalize(value: object) -> object:
    # Markup is our own SVG, already escaped; every other string is made unable to disguise.
    if isinstance(value, str) and not isinstance(value, Markup):
        return UNSAFE_CHARS.sub("\ufffd", value)
    return value


def _percent(value: float | None) -> str:
    return _MISSING if value is None else f"{value * 100:.1f}%"


def _number(value: float | None, digits: int = 4) -> str:
    return _MISSING if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _size(size_bytes: int | None) -> str:
    if size_bytes is None:
        return _MISSING
    if size_bytes < 1024:
        return f"{size_bytes} B"
    value = float(size_bytes) / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


_ENVIRONMENT = jinja2.Environment(
    loader=jinja2.PackageLoader("fedsilo.report", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    finalize=_finalize,
    trim_blocks=True,
    lstrip_blocks=True,
)
_ENVIRONMENT.filters.update(percent=_percent, number=_number, size=_size)


def _charts(data: ReportData) -> dict[str, Markup]:
    rounds = data.rounds
    charts: dict[str, Markup] = {}
    privacy = data.privacy
    if privacy.epsilon:
        delta = "" if privacy.delta is None else f" at \u03b4 = {privacy.delta:.3g}"
        charts["epsilon"] = Markup(
            line_chart(
                {s: [(float(r), e) for r, e in pts] for s, pts in privacy.epsilon.items()},
                title=f"Privacy loss \u03b5 per site after each round{delta}",
                x_label="round",
                y_label="epsilon (\u03b5)",
            )
        )
    if privacy.site_level_epsilon:
        charts["site_level"] = Markup(
            line_chart(
                {"site-level \u03b5": [(float(r), e) for r, e in privacy.site_level_epsilon]},
                title="Site-level privacy loss \u03b5 of the global adapter",
                x_label="round",
                y_label="epsilon (\u03b5)",
            )
        )
    if rounds:
        charts["loss"] = Markup(
            line_chart(
                {
                    "train loss": [
                        (float(r.round), r.train_loss) for r in rounds if r.train_loss is not None
                    ],
                    "gold loss": [
                        (float(r.round), r.gold_loss) for r in rounds if r.gold_loss is not None
                    ],
                },
                title="Loss over rounds",
                x_label="round",
                y_label="loss",
            )
        )
        charts["accuracy"] = Markup(
            line_chart(
                _accuracy_series(data.metric, data.secondary, rounds),
                title=f"Gold-set accuracy over rounds ({data.metric})",
                x_label="round",
                y_label="accuracy (fraction)",
                y_min=0.0,
                y_max=1.0,
            )
        )
    return charts


def _accuracy_series(
    metric: str, secondary: str, rounds: tuple[RoundRow, ...]
) -> dict[str, list[tuple[float, float]]]:
    return {
        f"accuracy ({metric})": [
            (float(r.round), r.gold_accuracy) for r in rounds if r.gold_accuracy is not None
        ],
        secondary: [
            (float(r.round), r.gold_category_accuracy)
            for r in rounds
            if r.gold_category_accuracy is not None
        ],
    }


def render_report(data: ReportData) -> str:
    """The whole report as one HTML document that loads nothing from anywhere.

    Raises:
        ValueError: a non-finite loss, accuracy or epsilon (the message names the series).
    """
    template = _ENVIRONMENT.get_template("report.html.j2")
    return (
        template.render(
            data=data,
            charts=_charts(data),
            missing=_MISSING,
            accepted_only=EPSILON_OF_ACCEPTED_UPDATES_ONLY.replace("`", ""),
        )
        + "\n"
    )


def write_report(data: ReportData, path: Path) -> None:
    """Render the report and write it to ``path`` atomically (whole or not at all)."""
    write_text_atomic(Path(path), render_report(data))
