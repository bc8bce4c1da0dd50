"""A self-contained HTML compliance report of a run, for auditors reading offline or on paper.

``ReportData`` and its records are the typed input; ``render_report`` turns it into one HTML
page (jinja2 with autoescaping, inline CSS, inline SVG charts, no scripts, no network
resources), ``write_report`` writes it atomically and ``write_pdf`` prints it to PDF with
headless Chromium.
"""

from fedsilo.report.html import render_report, write_report
from fedsilo.report.model import (
    DeclaredPolicy,
    Fact,
    Outcome,
    PartRow,
    Privacy,
    ReportData,
    RoundRow,
    SiteRow,
    UpdateRow,
    Verification,
)
from fedsilo.report.pdf import PdfError, find_chromium, write_pdf
from fedsilo.report.reader_text import one_line
from fedsilo.report.svg import line_chart

__all__ = [
    "DeclaredPolicy",
    "Fact",
    "Outcome",
    "PartRow",
    "PdfError",
    "Privacy",
    "ReportData",
    "RoundRow",
    "SiteRow",
    "UpdateRow",
    "Verification",
    "find_chromium",
    "line_chart",
    "one_line",
    "render_report",
    "write_pdf",
    "write_report",
]
