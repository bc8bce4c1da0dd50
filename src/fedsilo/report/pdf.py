"""The compliance report printed to PDF by headless Chromium, for the paper archive.

Chromium loads the report from a file URL with networking features off; the page itself
forbids every fetch (its Content-Security-Policy), so printing reaches nothing outside it.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from fedsilo.storage import write_bytes_atomic

CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
TIMEOUT_SECONDS = 120


class PdfError(RuntimeError):
    """Chromium is missing or did not produce a PDF."""


# Headless, no sandbox (root in containers), and none of the background connections a closed
# network would refuse at every start.
HEADLESS_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def find_chromium() -> str | None:
    """The headless Chromium to print with: Debian's /usr/bin/chromium first, else on PATH."""
    for candidate in CHROMIUM_PATHS:
        if Path(candidate).is_file():
            return candidate
    return shutil.which("chromium") or shutil.which("chromium-browser")


def write_pdf(html_path: Path, pdf_path: Path, *, chromium: str | None = None) -> None:
    """Print the HTML report at ``html_path`` to ``pdf_path`` (written whole or not at all)."""
    browser = chromium or find_chromium()
    if browser is None:
        raise PdfError("--pdf needs Chromium (Debian: apt-get install chromium); none was found")
    with tempfile.TemporaryDirectory(prefix="fedsilo-pdf-") as scratch:
        out = Path(scratch) / "report.pdf"
        command = [
            browser,
            *HEADLESS_FLAGS,
            "--no-pdf-header-footer",
            f"--user-data-dir={Path(scratch) / 'profile'}",
            f"--print-to-pdf={out}",
            Path(html_path).resolve().as_uri(),
        ]
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=TIMEOUT_SECONDS, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise PdfError(f"{browser} could not print {html_path}: {error}") from None
        if result.returncode != 0 or not out.is_file() or not out.read_bytes().startswith(b"%PDF"):
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise PdfError(
                f"{browser} did not print {html_path} to PDF (exit {result.returncode}): {last}"
            )
        write_bytes_atomic(Path(pdf_path), out.read_bytes())
