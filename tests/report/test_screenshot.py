"""Render the report in headless Chromium and check that the screenshot shows a real page.

The check decodes the PNG with the standard library and counts distinct colours: a blank or
failed render is one or two flat colours, while a page with text (anti-aliased), tables,
the banner and charts has hundreds. It also looks for the PASS banner's background colour,
which proves the inline stylesheet was applied. Both checks are independent of fonts, exact
layout and PNG compression settings, which a file-size threshold would not be.
"""

from __future__ import annotations

import struct
import subprocess
import zlib
from collections import Counter
from pathlib import Path

import pytest

from fedsilo.report import ReportData, write_report
from fedsilo.report.pdf import HEADLESS_FLAGS, find_chromium

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PASS_BANNER_RGB = (0xE6, 0xF4, 0xEA)  # .banner.pass background in the report's CSS
_WIDTH, _HEIGHT = 1280, 2000


def _unfilter(kind: int, line: bytearray, prev: bytearray, bpp: int) -> bytearray:
    """Undo one PNG scanline filter (PNG spec, section 9)."""
    if kind == 1:  # Sub
        for i in range(bpp, len(line)):
            line[i] = (line[i] + line[i - bpp]) & 0xFF
    elif kind == 2:  # Up
        line = bytearray((a + b) & 0xFF for a, b in zip(line, prev, strict=True))
    elif kind == 3:  # Average
        for i in range(len(line)):
            left = line[i - bpp] if i >= bpp else 0
            line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
    elif kind == 4:  # Paeth
        for i in range(len(line)):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
    elif kind != 0:
        raise AssertionError(f"unknown PNG filter type {kind}")
    return line


def _decode_rgb(data: bytes) -> tuple[int, int, list[tuple[int, int, int]]]:
    """Width, height and RGB pixels of an 8-bit, non-interlaced RGB or RGBA PNG."""
    assert data[:8] == _PNG_SIGNATURE
    pos, chunks, header = 8, [], None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            chunks.append(body)
        elif kind == b"IEND":
            break
    assert header is not None, "PNG has no IHDR chunk"
    width, height, depth, colour_type, _, _, interlace = header
    assert depth == 8 and colour_type in (2, 6) and interlace == 0, f"unexpected PNG {header}"
    bpp = 3 if colour_type == 2 else 4
    raw = zlib.decompress(b"".join(chunks))
    stride = width * bpp
    pixels: list[tuple[int, int, int]] = []
    prev = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        line = _unfilter(raw[start], bytearray(raw[start + 1 : start + 1 + stride]), prev, bpp)
        pixels.extend(zip(line[0::bpp], line[1::bpp], line[2::bpp], strict=True))
        prev = line
    return width, height, pixels


def _screenshot(html_path: Path, tmp_path: Path) -> bytes:
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("chromium not installed: apt-get install chromium")
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            chromium,
            *HEADLESS_FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            f"--window-size={_WIDTH},{_HEIGHT}",
            html_path.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return shot.read_bytes()


def test_report_renders_as_a_non_blank_page(tmp_path: Path, report_data: ReportData) -> None:
    report = tmp_path / "report.html"
    write_report(report_data, report)

    png = _screenshot(report, tmp_path)

    assert png[:8] == _PNG_SIGNATURE
    width, height, pixels = _decode_rgb(png)
    colours = Counter(pixels)
    assert (width, height) == (_WIDTH, _HEIGHT)
    assert len(colours) >= 64, f"only {len(colours)} distinct colours: blank render?"
    banner = sum(
        n
        for rgb, n in colours.items()
        if all(abs(c - e) <= 2 for c, e in zip(rgb, _PASS_BANNER_RGB, strict=True))
    )
    assert banner >= 10_000, f"PASS banner background covers only {banner} pixels"


_FAIL_BANNER_RGB = (0xFD, 0xEC, 0xEA)  # .banner.fail background


def test_failed_run_renders_a_red_banner_and_no_green_one(tmp_path: Path) -> None:
    from tests.report.conftest import make_report_data

    report = tmp_path / "report.html"
    write_report(make_report_data(status="failed"), report)

    _, _, pixels = _decode_rgb(_screenshot(report, tmp_path))
    colours = Counter(pixels)

    def covered(rgb: tuple[int, int, int]) -> int:
        return sum(
            n
            for c, n in colours.items()
            if all(abs(a - b) <= 2 for a, b in zip(c, rgb, strict=True))
        )

    assert covered(_FAIL_BANNER_RGB) >= 10_000
    # The small "accepted" pills share the banner's green; a green banner alone covers 10,000+.
    assert covered(_PASS_BANNER_RGB) < 6_000


def test_pdf_is_printed_for_the_paper_archive(tmp_path: Path, report_data: ReportData) -> None:
    from fedsilo.report import write_pdf

    chromium = find_chromium()
    if chromium is None:
        pytest.skip("chromium not installed: apt-get install chromium")
    report = tmp_path / "report.html"
    write_report(report_data, report)

    write_pdf(report, tmp_path / "report.pdf", chromium=chromium)

    pdf = (tmp_path / "report.pdf").read_bytes()
    assert pdf.startswith(b"%PDF-")
    assert pdf.rstrip().endswith(b"%%EOF")
    assert pdf.count(b"/Type /Page") + pdf.count(b"/Type/Page") >= 2  # the report spans pages
