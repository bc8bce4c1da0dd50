"""Line charts as inline SVG strings, drawn without any plotting library or script.

The output is a single well-formed ``<svg>`` element meant to be embedded in an HTML page that
is read offline: no external fonts, stylesheets or namespaces are referenced (inline SVG in
HTML needs no ``xmlns``). Every piece of text is escaped, since series names are site names
chosen by other parties.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Okabe & Ito's palette, readable with the common forms of colour blindness. Yellow is last:
# it is the hardest to see on white.
PALETTE: tuple[str, ...] = (
    "#0072B2",  # blue
    "#D55E00",  # vermillion
    "#009E73",  # bluish green
    "#CC79A7",  # reddish purple
    "#E69F00",  # orange
    "#56B4E9",  # sky blue
    "#000000",  # black
    "#F0E442",  # yellow
)
# Past the palette, series differ by dash pattern; marker shapes also differ, so a chart stays
# readable printed in grey.
_DASHES: tuple[str, ...] = ("", "6 3", "2 3")
_MARKERS: tuple[str, ...] = ("circle", "square", "triangle", "diamond")

_MARGIN_LEFT = 64
_MARGIN_RIGHT = 12
_MARGIN_TOP = 40
_MARGIN_BOTTOM = 48
_LEGEND_WIDTH = 184
_LEGEND_ROW = 18
_LEGEND_MAX_CHARS = 20
_TARGET_TICKS = 5
_MIN_WIDTH = 320
_MIN_HEIGHT = 160

# Characters that are not allowed in XML 1.0 (or are C1 controls, which HTML also rejects), and
# the bidirectional embedding/override/isolate controls, which could make an untrusted name
# display as something else. They are shown as U+FFFD so the reader sees that something is odd.
UNSAFE_CHARS = re.compile(
    "[^\t\n\r\x20-\x7e\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]|[\u202a-\u202e\u2066-\u2069]"
)


def escape_text(text: str) -> str:
    """``text`` made safe for HTML and XML content and attribute values.

    Markup characters and quotes are escaped; characters that are invalid in XML, control
    characters and bidirectional overrides are replaced by U+FFFD.
    """
    return html.escape(UNSAFE_CHARS.sub("\ufffd", text), quote=True)


@dataclass(frozen=True)
class _Axis:
    lo: float
    hi: float
    ticks: tuple[float, ...]
    decimals: int | None  # None: format ticks with a few significant digits

    def scale(self, value: float, start: float, length: float) -> float:
        return start + (value - self.lo) / (self.hi - self.lo) * length


def _nice_step(span: float, *, integer: bool) -> float:
    raw = span / _TARGET_TICKS
    magnitude = 10.0 ** math.floor(math.log10(raw))
    normalized = raw / magnitude
    nice = next((n for n in (1.0, 2.0, 5.0) if normalized <= n), 10.0)
    step = nice * magnitude
    return max(step, 1.0) if integer else step


def _axis(
    values: Sequence[float], *, lo_fixed: float | None, hi_fixed: float | None, integer: bool
) -> _Axis:
    """An axis covering every value (and the fixed bounds), with a few round-numbered ticks."""
    lo = min([*values, *([lo_fixed] if lo_fixed is not None else [])])
    hi = max([*values, *([hi_fixed] if hi_fixed is not None else [])])
    if lo == hi:
        # One distinct value: centre it with a single tick that names it exactly.
        pad = 1.0 if integer or lo == 0 else abs(lo) * 0.1
        return _Axis(
            lo=lo if lo_fixed is not None else lo - pad,
            hi=hi if hi_fixed is not None else hi + pad,
            ticks=(lo,),
            decimals=None,
        )
    step = _nice_step(hi - lo, integer=integer)
    # A free end snaps outward to a tick; a fixed end stays exactly where the caller put it.
    if lo_fixed is None or lo < lo_fixed:
        lo = math.floor(lo / step + 1e-9) * step
    if hi_fixed is None or hi > hi_fixed:
        hi = math.ceil(hi / step - 1e-9) * step
    first = math.ceil(lo / step - 1e-9)
    last = math.floor(hi / step + 1e-9)
    ticks = tuple(i * step for i in range(first, last + 1))
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return _Axis(lo=lo, hi=hi, ticks=ticks, decimals=decimals)


def _format_tick(value: float, decimals: int | None) -> str:
    if decimals is None or decimals > 6 or abs(value) >= 1e6:
        text = f"{value:.4g}"
    else:
        text = f"{value:.{decimals}f}"
    # "-0.0" reads as a bug; a tick at zero is zero.
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def _num(value: float) -> str:
    return f"{value:.1f}"


def _marker(shape: str, x: float, y: float, colour: str) -> str:
    r = 3.5
    if shape == "circle":
        return f'<circle cx="{_num(x)}" cy="{_num(y)}" r="{r}" fill="{colour}"/>'
    if shape == "square":
        return (
            f'<rect x="{_num(x - r)}" y="{_num(y - r)}" width="{2 * r}" height="{2 * r}" '
            f'fill="{colour}"/>'
        )
    if shape == "triangle":
        points = [(x, y - r * 1.2), (x - r * 1.2, y + r), (x + r * 1.2, y + r)]
    else:  # diamond
        points = [(x, y - r * 1.3), (x + r * 1.3, y), (x, y + r * 1.3), (x - r * 1.3, y)]
    joined = " ".join(f"{_num(px)},{_num(py)}" for px, py in points)
    return f'<polygon points="{joined}" fill="{colour}"/>'


def _checked_points(
    series: Mapping[str, Sequence[tuple[float, float]]],
) -> dict[str, list[tuple[float, float]]]:
    checked: dict[str, list[tuple[float, float]]] = {}
    for name, points in series.items():
        clean: list[tuple[float, float]] = []
        for index, (x, y) in enumerate(points):
            if not (math.isfinite(x) and math.isfinite(y)):
                raise ValueError(
                    f"series {name!r}, point {index}: x and y must be finite numbers, "
                    f"got ({x!r}, {y!r})"
                )
            clean.append((float(x), float(y)))
        # A line chart joins points left to right, whatever order they came in.
        checked[name] = sorted(clean, key=lambda point: point[0])
    return checked


def _shorten(label: str) -> str:
    if len(label) <= _LEGEND_MAX_CHARS:
        return label
    return label[: _LEGEND_MAX_CHARS - 1] + "\u2026"


def _open_svg(width: int, height: int, title: str, description: str) -> list[str]:
    safe_title = escape_text(title)
    return [
        f'<svg class="chart" role="img" aria-label="{safe_title}" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" '
        'font-size="12">',
        f"<title>{safe_title}</title>",
        f"<desc>{escape_text(description)}</desc>",
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
        f'<text x="{width / 2:.1f}" y="22" text-anchor="middle" font-size="14" '
        f'font-weight="bold" fill="#222222">{safe_title}</text>',
    ]


def _no_data(title: str, width: int, height: int) -> str:
    parts = _open_svg(width, height, title, "No data to plot.")
    parts.append(
        f'<rect x="{_MARGIN_LEFT}" y="{_MARGIN_TOP}" '
        f'width="{width - _MARGIN_LEFT - _MARGIN_RIGHT}" '
        f'height="{height - _MARGIN_TOP - _MARGIN_BOTTOM}" fill="none" stroke="#999999" '
        'stroke-dasharray="4 4"/>'
    )
    parts.append(
        f'<text x="{width / 2:.1f}" y="{(height + _MARGIN_TOP - _MARGIN_BOTTOM) / 2:.1f}" '
        'text-anchor="middle" font-size="14" fill="#666666">no data</text>'
    )
    parts.append("</svg>")
    return "".join(parts)


_DODGE_PIXELS = 4.0


def _dodge_offsets(points: Mapping[str, Sequence[tuple[float, float]]]) -> dict[str, float]:
    """A sideways pixel shift per series, non-zero only when some series share a point.

    Shifting every series (centred on zero) keeps the order of the legend left to right.
    """
    seen: set[tuple[float, float]] = set()
    coincide = False
    for series_points in points.values():
        own = set(series_points)
        coincide = coincide or bool(own & seen)
        seen |= own
    names = list(points)
    if not coincide:
        return dict.fromkeys(names, 0.0)
    middle = (len(names) - 1) / 2
    return {name: (index - middle) * _DODGE_PIXELS for index, name in enumerate(names)}


def _describe(points: Mapping[str, Sequence[tuple[float, float]]]) -> str:
    lines = []
    for name, series_points in points.items():
        if not series_points:
            lines.append(f"{name}: no points.")
            continue
        ys = [y for _, y in series_points]
        lines.append(
            f"{name}: {len(series_points)} point(s), x from {series_points[0][0]:g} to "
            f"{series_points[-1][0]:g}, y from {min(ys):.4g} to {max(ys):.4g}."
        )
    return " ".join(lines)


def line_chart(
    series: Mapping[str, Sequence[tuple[float, float]]],
    *,
    title: str,
    x_label: str,
    y_label: str,
    y_min: float | None = None,
    y_max: float | None = None,
    y_from_zero: bool = True,
    width: int = 640,
    height: int = 300,
) -> str:
    """One ``<svg>`` element plotting each series as a line with point markers, plus a legend.

    ``series`` maps a name to its ``(x, y)`` points, joined in order of x. ``y_min`` and
    ``y_max`` fix the ends of the y axis (0 and 1 for an accuracy); the axis still widens to
    include any point outside them, so no point is ever clipped. When every x is a whole number
    (rounds), x ticks are whole numbers. A chart without any point shows a "no data"
    placeholder. The chart grows taller when the legend needs more room than ``height``.

    The y axis starts at zero (for data that is not negative) unless ``y_from_zero`` is False;
    then an axis that does not reach zero is drawn with a break mark and "axis cut" in its
    label, so a small change is never stretched over the whole height unannounced. Where
    points of different series coincide, each series' markers are shifted sideways by a few
    pixels (said in the chart's description), so no series hides under another.

    Raises:
        ValueError: a non-finite x or y (the message names the series and the point), ``y_min``
            not below ``y_max``, or a size too small to draw in.
    """
    if width < _MIN_WIDTH or height < _MIN_HEIGHT:
        raise ValueError(
            f"chart {title!r}: width and height must be at least {_MIN_WIDTH}x{_MIN_HEIGHT}, "
            f"got {width}x{height}"
        )
    if y_min is not None and y_max is not None and not y_min < y_max:
        raise ValueError(f"chart {title!r}: y_min ({y_min}) must be below y_max ({y_max})")
    points = _checked_points(series)
    all_points = [point for series_points in points.values() for point in series_points]
    if not all_points:
        return _no_data(title, width, height)

    height = max(height, _MARGIN_TOP + len(points) * _LEGEND_ROW + _MARGIN_BOTTOM)
    plot_left = _MARGIN_LEFT
    plot_top = _MARGIN_TOP
    plot_width = width - _MARGIN_LEFT - _MARGIN_RIGHT - _LEGEND_WIDTH
    plot_height = height - _MARGIN_TOP - _MARGIN_BOTTOM
    plot_bottom = plot_top + plot_height
    xs = [x for x, _ in all_points]
    ys = [y for _, y in all_points]
    x_axis = _axis(xs, lo_fixed=None, hi_fixed=None, integer=all(x.is_integer() for x in xs))
    if y_min is None and y_from_zero and min(ys) >= 0:
        y_min = 0.0
    y_axis = _axis(ys, lo_fixed=y_min, hi_fixed=y_max, integer=False)
    cut = y_axis.lo > 0 or y_axis.hi < 0
    dodge = _dodge_offsets(points)

    def px(x: float) -> float:
        return x_axis.scale(x, plot_left, plot_width)

    def py(y: float) -> float:
        return plot_top + plot_height - y_axis.scale(y, 0.0, plot_height)

    description = _describe(points)
    if any(dodge.values()):
        description += " Coinciding points are shifted sideways a few pixels per series."
    if cut:
        description += " The y axis does not start at zero."
    parts = _open_svg(width, height, title, description)
    for tick in y_axis.ticks:
        y = py(tick)
        parts.append(
            f'<line x1="{plot_left}" y1="{_num(y)}" x2="{plot_left + plot_width}" '
            f'y2="{_num(y)}" stroke="#e3e3e3"/>'
            f'<text x="{plot_left - 6}" y="{_num(y + 4)}" text-anchor="end" fill="#333333">'
            f"{_format_tick(tick, y_axis.decimals)}</text>"
        )
    for tick in x_axis.ticks:
        x = px(tick)
        parts.append(
            f'<line x1="{_num(x)}" y1="{plot_bottom}" x2="{_num(x)}" y2="{plot_bottom + 5}" '
            'stroke="#333333"/>'
            f'<text x="{_num(x)}" y="{plot_bottom + 18}" text-anchor="middle" fill="#333333">'
            f"{_format_tick(tick, x_axis.decimals)}</text>"
        )
    parts.append(
        f'<polyline points="{plot_left},{plot_top} {plot_left},{plot_bottom} '
        f'{plot_left + plot_width},{plot_bottom}" fill="none" stroke="#333333"/>'
    )
    parts.append(
        f'<text x="{_num(plot_left + plot_width / 2)}" y="{height - 10}" text-anchor="middle" '
        f'fill="#222222">{escape_text(x_label)}</text>'
    )
    parts.append(
        f'<text transform="translate(16 {_num(plot_top + plot_height / 2)}) rotate(-90)" '
        f'text-anchor="middle" fill="#222222">'
        f"{escape_text(y_label + (' (axis cut)' if cut else ''))}</text>"
    )
    if cut:
        # Two short slanted strokes across the y axis: the conventional "broken axis" mark.
        for dy in (0, 5):
            y = plot_bottom - 12 - dy
            parts.append(
                f'<line class="axis-cut" x1="{plot_left - 5}" y1="{y + 3}" '
                f'x2="{plot_left + 5}" y2="{y - 3}" stroke="#333333" stroke-width="1.5"/>'
            )

    legend_x = plot_left + plot_width + 16
    for index, (name, series_points) in enumerate(points.items()):
        colour = PALETTE[index % len(PALETTE)]
        dash = _DASHES[(index // len(PALETTE)) % len(_DASHES)]
        shape = _MARKERS[index % len(_MARKERS)]
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        safe_name = escape_text(name)
        shift = dodge[name]
        parts.append(f'<g class="series"><title>{safe_name}</title>')
        if len(series_points) > 1:
            joined = " ".join(f"{_num(px(x) + shift)},{_num(py(y))}" for x, y in series_points)
            parts.append(
                f'<polyline points="{joined}" fill="none" stroke="{colour}" stroke-width="2"'
                f"{dash_attr}/>"
            )
        parts.extend(_marker(shape, px(x) + shift, py(y), colour) for x, y in series_points)
        parts.append("</g>")

        row_y = plot_top + 8 + index * _LEGEND_ROW
        parts.append(
            f'<g class="legend-entry"><title>{safe_name}</title>'
            f'<line x1="{legend_x}" y1="{row_y}" x2="{legend_x + 22}" y2="{row_y}" '
            f'stroke="{colour}" stroke-width="2"{dash_attr}/>'
            f"{_marker(shape, legend_x + 11, row_y, colour)}"
            f'<text x="{legend_x + 28}" y="{row_y + 4}" fill="#222222">'
            f"{escape_text(_shorten(name))}</text></g>"
        )
    parts.append("</svg>")
    return "".join(parts)
