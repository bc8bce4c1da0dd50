"""The compliance report as one self-contained HTML page, for reading offline or on paper.

The page loads nothing: CSS is inline, charts are inline SVG, there is no script, and a
Content-Security-Policy forbids every fetch in case anything slipped in. Every string taken
from the data is escaped, because site names and rejection reasons come from other parties.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from fedsilo.report.model import ReportData, RoundRow, SiteRow, UpdateRow
from fedsilo.report.svg import escape_text, line_chart
from fedsilo.storage import write_text_atomic

_SHORT_HASH_CHARS = 12
_MISSING = "\u2014"  # em dash: a value that does not exist, as opposed to zero

_NO_DP_NOTE = "No differential privacy configured: epsilon is not bounded."

_CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; background: #f4f5f7; color: #1d1d1f;
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
  sans-serif; }
main { max-width: 1040px; margin: 0 auto; padding: 24px 32px 48px; background: #ffffff; }
h1 { font-size: 26px; margin: 0 0 12px; }
h2 { font-size: 19px; margin: 32px 0 10px; padding-bottom: 4px; border-bottom: 2px solid #d8dbe0; }
h3 { font-size: 15px; margin: 16px 0 6px; }
.subtitle { color: #555b66; margin: 0 0 16px; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 4px 20px; margin: 0; }
dl.facts dt { font-weight: 600; color: #3a3f47; }
dl.facts dd { margin: 0; overflow-wrap: anywhere; }
code, .mono { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, "Liberation Mono",
  monospace; font-size: 13px; overflow-wrap: anywhere; }
.banner { border-radius: 6px; padding: 16px 20px; margin: 20px 0 8px; border: 2px solid; }
.banner .verdict { font-size: 34px; font-weight: 800; letter-spacing: 2px; line-height: 1.1; }
.banner p { margin: 6px 0 0; font-size: 16px; }
.banner ul { margin: 8px 0 0; padding-left: 22px; }
.banner.pass { background: #e6f4ea; border-color: #1e7e34; color: #14532d; }
.banner.fail { background: #fdecea; border-color: #b3261e; color: #7f1d1d; }
table { border-collapse: collapse; width: 100%; margin: 4px 0 8px; font-size: 14px; }
th, td { text-align: left; padding: 5px 10px; border-bottom: 1px solid #e1e4e8;
  vertical-align: top; }
th { background: #eef0f3; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.num { white-space: nowrap; }
td.reason { overflow-wrap: anywhere; }
tr.rejected td { background: #fff6f5; }
.status { display: inline-block; padding: 0 8px; border-radius: 10px; font-size: 12px;
  font-weight: 700; white-space: nowrap; }
.status.ok { background: #e6f4ea; color: #14532d; }
.status.bad { background: #fdecea; color: #7f1d1d; }
.note { background: #fff8e1; border-left: 4px solid #e69f00; padding: 10px 14px; margin: 8px 0; }
.empty { color: #666b73; font-style: italic; }
figure { margin: 12px 0 20px; break-inside: avoid; page-break-inside: avoid; }
svg.chart { max-width: 100%; height: auto; display: block; }
footer { margin-top: 36px; color: #666b73; font-size: 12px; }
@page { size: A4; margin: 14mm 12mm; }
/* An A4 page is about 700 CSS pixels wide: tighten tables so the rounds table fits it. */
@media (max-width: 820px), print {
  main { padding: 16px; }
  table { font-size: 12px; }
  th, td { padding: 4px 6px; }
  code, .mono { font-size: 11px; }
}
@media print {
  body { background: #ffffff; font-size: 11pt; }
  main { max-width: none; padding: 0; }
  h2 { break-after: avoid; page-break-after: avoid; }
  thead { display: table-header-group; }
  tr { break-inside: avoid; page-break-inside: avoid; }
  .banner, .status, tr.rejected td, th, .note { -webkit-print-color-adjust: exact;
    print-color-adjust: exact; }
}
"""


def _e(text: str) -> str:
    return escape_text(text)


def _fact_list(items: Iterable[tuple[str, str, bool]]) -> str:
    """A definition list of (label, value, monospace) facts."""
    rows = []
    for label, value, mono in items:
        body = f"<code>{_e(value)}</code>" if mono else _e(value)
        rows.append(f"<dt>{_e(label)}</dt><dd>{body}</dd>")
    return f'<dl class="facts">{"".join(rows)}</dl>'


def _table(headers: Sequence[tuple[str, bool]], rows: Sequence[str], empty: str) -> str:
    """A table from (header, numeric) columns and pre-rendered ``<tr>`` rows."""
    if not rows:
        return f'<p class="empty">{_e(empty)}</p>'
    head = "".join(
        f'<th class="num">{_e(h)}</th>' if numeric else f"<th>{_e(h)}</th>"
        for h, numeric in headers
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _short_hash(value: str) -> str:
    """The first characters of a digest, with the full value in a tooltip."""
    shown = value if len(value) <= _SHORT_HASH_CHARS else value[:_SHORT_HASH_CHARS] + "\u2026"
    return f'<code title="{_e(value)}">{_e(shown)}</code>'


def _fraction(value: float) -> str:
    return f"{value * 100:.1f}%"


def _loss(value: float | None) -> str:
    return _MISSING if value is None else f"{value:.4f}"


def _size(size_bytes: int | None) -> str:
    if size_bytes is None:
        return _MISSING
    if size_bytes < 1024:
        return f"{size_bytes} B"
    value = float(size_bytes)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    return f"{value:.1f} {unit}"


def _header(data: ReportData) -> str:
    verdict, css, words = (
        ("PASS", "pass", "Verification passed")
        if data.verify_ok
        else ("FAIL", "fail", "Verification failed")
    )
    problems = ""
    if data.verify_problems:
        items = "".join(f"<li>{_e(problem)}</li>" for problem in data.verify_problems)
        problems = f"<ul>{items}</ul>"
    facts = _fact_list(
        [
            ("Run", data.run_name, False),
            ("Federation", data.federation_id, True),
            ("Generated at", data.generated_at, False),
        ]
    )
    return (
        "<header><h1>Federated training compliance report</h1>"
        f"{facts}"
        f'<section class="banner {css}" aria-label="{words}">'
        f'<div class="verdict">{verdict}</div><p><strong>{words}.</strong> '
        f"{_e(data.verify_summary)}</p>{problems}</section></header>"
    )


def _provenance(data: ReportData) -> str:
    facts = _fact_list(
        [
            ("Base model hash", data.base_model_hash, True),
            ("Configuration digest", data.config_digest, True),
            ("Coordinator key fingerprint", data.coordinator_fingerprint, True),
            ("Aggregation strategy", data.strategy, False),
            ("Privacy", data.privacy_summary, False),
        ]
    )
    return f"<section><h2>Provenance</h2>{facts}</section>"


def _site_row(site: SiteRow) -> str:
    return (
        f"<tr><td>{_e(site.name)}</td><td><code>{_e(site.fingerprint)}</code></td>"
        f'<td class="num">{site.accepted}</td><td class="num">{site.rejected}</td></tr>'
    )


def _sites(data: ReportData) -> str:
    table = _table(
        [("Site", False), ("Key fingerprint", False), ("Accepted", True), ("Rejected", True)],
        [_site_row(site) for site in data.sites],
        "No sites are recorded for this run.",
    )
    return f"<section><h2>Sites</h2>{table}</section>"


def _round_row(row: RoundRow) -> str:
    return (
        f'<tr><td class="num">{row.round}</td><td class="num">{row.sites_ok}</td>'
        f'<td class="num">{row.sites_failed}</td><td class="num">{_loss(row.train_loss)}</td>'
        f'<td class="num">{_fraction(row.gold_accuracy)}</td>'
        f'<td class="num">{_fraction(row.gold_category_accuracy)}</td>'
        f'<td class="num">{_loss(row.gold_loss)}</td>'
        f"<td>{_short_hash(row.adapter_sha256)}</td></tr>"
    )


def _rounds(data: ReportData) -> str:
    table = _table(
        [
            ("Round", True),
            ("Sites OK", True),
            ("Sites failed", True),
            ("Train loss", True),
            ("Gold accuracy", True),
            ("Category accuracy", True),
            ("Gold loss", True),
            ("Adapter sha256", False),
        ],
        [_round_row(row) for row in data.rounds],
        "No rounds are recorded for this run.",
    )
    note = (
        '<p class="subtitle">Round 0 is the base model before training. '
        "Hover over an adapter hash to see it in full.</p>"
    )
    return f"<section><h2>Rounds</h2>{note if data.rounds else ''}{table}</section>"


def _update_row(update: UpdateRow) -> str:
    if update.accepted:
        status = '<span class="status ok">accepted</span>'
        detail = f"<code>{_e(update.detail)}</code>"
        row_class = ""
    else:
        status = '<span class="status bad">rejected</span>'
        detail = _e(update.detail)
        row_class = ' class="rejected"'
    return (
        f'<tr{row_class}><td class="num">{update.round}</td><td>{_e(update.site)}</td>'
        f'<td>{status}</td><td class="reason">{detail}</td>'
        f'<td class="num">{_size(update.size_bytes)}</td></tr>'
    )


def _updates(data: ReportData) -> str:
    table = _table(
        [
            ("Round", True),
            ("Site", False),
            ("Outcome", False),
            ("Payload digest or rejection reason", False),
            ("Size", True),
        ],
        [_update_row(update) for update in data.updates],
        "No updates are recorded for this run.",
    )
    return f"<section><h2>Updates</h2>{table}</section>"


def _figure(svg: str) -> str:
    return f"<figure>{svg}</figure>"


def _privacy_plot(data: ReportData) -> str:
    if not data.epsilon:
        return f'<p class="note"><strong>{_e(_NO_DP_NOTE)}</strong></p>'
    delta = "" if data.delta is None else f" at \u03b4 = {data.delta:.3g}"
    chart = line_chart(
        {site: [(float(r), eps) for r, eps in points] for site, points in data.epsilon.items()},
        title=f"Cumulative privacy loss \u03b5 per site{delta}",
        x_label="round",
        y_label="epsilon (\u03b5)",
        y_min=0.0,
    )
    final_rows = []
    for site, points in data.epsilon.items():
        if points:
            last_round, last_eps = max(points, key=lambda point: point[0])
            final_rows.append(
                f'<tr><td>{_e(site)}</td><td class="num">{last_round}</td>'
                f'<td class="num">{last_eps:.4g}</td></tr>'
            )
        else:
            final_rows.append(
                f'<tr><td>{_e(site)}</td><td class="num">{_MISSING}</td>'
                f'<td class="num">{_MISSING}</td></tr>'
            )
    table = _table(
        [("Site", False), ("After round", True), ("\u03b5", True)],
        final_rows,
        "No sites are recorded for this run.",
    )
    return f"{_figure(chart)}<h3>Privacy loss at the end of the run{_e(delta)}</h3>{table}"


def _plots(data: ReportData) -> str:
    rounds = data.rounds
    losses = line_chart(
        {
            "train loss": [
                (float(r.round), r.train_loss) for r in rounds if r.train_loss is not None
            ],
            "gold loss": [(float(r.round), r.gold_loss) for r in rounds],
        },
        title="Loss over rounds",
        x_label="round",
        y_label="loss",
    )
    accuracy = line_chart(
        {
            "gold accuracy": [(float(r.round), r.gold_accuracy) for r in rounds],
            "category accuracy": [(float(r.round), r.gold_category_accuracy) for r in rounds],
        },
        title="Gold-set accuracy over rounds",
        x_label="round",
        y_label="accuracy (fraction)",
        y_min=0.0,
        y_max=1.0,
    )
    return (
        "<section><h2>Privacy</h2>"
        f"{_privacy_plot(data)}</section>"
        f"<section><h2>Training and evaluation</h2>{_figure(losses)}{_figure(accuracy)}</section>"
    )


def render_report(data: ReportData) -> str:
    """The whole report as one HTML document that loads nothing from anywhere.

    Raises:
        ValueError: a non-finite loss, accuracy or epsilon (the message names the series).
    """
    body = "".join(
        [
            _header(data),
            _provenance(data),
            _sites(data),
            _rounds(data),
            _updates(data),
            _plots(data),
            "<footer>This report is self-contained: it loads no fonts, scripts, stylesheets or "
            "images from anywhere.</footer>",
        ]
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        # No fetches at all: inline styles are the only resource the page may use.
        '<meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Compliance report: {_e(data.run_name)}</title>"
        f"<style>{_CSS}</style></head><body><main>{body}</main></body></html>\n"
    )


def write_report(data: ReportData, path: Path) -> None:
    """Render the report and write it to ``path`` atomically (whole or not at all)."""
    write_text_atomic(Path(path), render_report(data))
