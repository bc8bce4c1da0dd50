"""A self-contained HTML compliance report of a federated run, for auditors reading offline.

``ReportData`` and its rows are the typed input; ``render_report`` turns it into one HTML page
(inline CSS, inline SVG charts, no scripts, no network resources) and ``write_report`` writes it
atomically.
"""

from fedsilo.report.html import render_report, write_report
from fedsilo.report.model import ReportData, RoundRow, SiteRow, UpdateRow
from fedsilo.report.svg import line_chart

__all__ = [
    "ReportData",
    "RoundRow",
    "SiteRow",
    "UpdateRow",
    "line_chart",
    "render_report",
    "write_report",
]
