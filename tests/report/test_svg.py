import math
import re
import xml.etree.ElementTree as ET

import pytest

from fedsilo.report import line_chart
from fedsilo.report.svg import PALETTE, escape_text


def _chart(series: dict[str, list[tuple[float, float]]], **kwargs: float) -> ET.Element:
    svg = line_chart(series, title="Loss", x_label="round", y_label="loss", **kwargs)
    return ET.fromstring(svg)


def _texts(root: ET.Element) -> list[str]:
    return [el.text or "" for el in root.iter("text")]


def _coordinates(root: ET.Element) -> list[float]:
    values: list[float] = []
    for el in root.iter():
        for attr in ("cx", "cy", "x", "y", "x1", "y1", "x2", "y2"):
            if attr in el.attrib:
                values.append(float(el.attrib[attr]))
        for pair in el.attrib.get("points", "").split():
            values.extend(float(v) for v in pair.split(","))
    return values


def test_chart_is_well_formed_accessible_svg() -> None:
    root = _chart({"train loss": [(0, 3.0), (1, 2.5)]})

    assert root.tag == "svg"
    assert root.attrib["role"] == "img"
    assert root.find("title") is not None
    assert root.find("title").text == "Loss"  # type: ignore[union-attr]


def test_each_series_gets_one_line_in_its_own_colour() -> None:
    root = _chart({"a": [(0, 1.0), (1, 2.0)], "b": [(0, 2.0), (1, 1.0)], "c": [(0, 0.5), (1, 0.5)]})

    series_lines = [g.find("polyline") for g in root.iter("g") if g.get("class") == "series"]

    assert [line.get("stroke") for line in series_lines] == list(PALETTE[:3])  # type: ignore[union-attr]


def test_every_point_gets_a_marker() -> None:
    root = _chart({"a": [(0, 1.0), (1, 2.0), (2, 1.5)]})

    (series,) = [g for g in root.iter("g") if g.get("class") == "series"]

    assert len([el for el in series if el.tag != "title" and el.tag != "polyline"]) == 3


def test_legend_names_every_series() -> None:
    root = _chart({"train loss": [(0, 1.0)], "gold loss": [(0, 2.0)]})

    assert "train loss" in _texts(root)
    assert "gold loss" in _texts(root)


def test_long_series_name_is_shortened_in_legend_but_kept_in_title() -> None:
    name = "university-hospital-of-somewhere-far-away"
    root = _chart({name: [(0, 1.0), (1, 2.0)]})

    legend = next(g for g in root.iter("g") if g.get("class") == "legend-entry")

    assert legend.find("title").text == name  # type: ignore[union-attr]
    assert name not in _texts(root)
    assert any(text.endswith("\u2026") for text in _texts(root))


def test_single_point_is_drawn_as_marker_without_line() -> None:
    root = _chart({"a": [(2, 0.7)]})

    (series,) = [g for g in root.iter("g") if g.get("class") == "series"]

    assert series.find("polyline") is None
    assert series.find("circle") is not None
    assert all(math.isfinite(v) for v in _coordinates(root))


def test_all_equal_values_get_one_tick_naming_the_value() -> None:
    root = _chart({"a": [(0, 0.5), (1, 0.5), (2, 0.5)]})

    assert "0.5" in _texts(root)
    assert all(math.isfinite(v) for v in _coordinates(root))


def test_empty_mapping_renders_no_data_placeholder() -> None:
    root = _chart({})

    assert "no data" in _texts(root)
    assert root.attrib["role"] == "img"


def test_series_without_points_render_no_data_placeholder() -> None:
    root = _chart({"a": [], "b": []})

    assert "no data" in _texts(root)


def test_nan_is_refused_naming_series_and_point() -> None:
    with pytest.raises(ValueError, match=r"series 'gold loss', point 1"):
        line_chart(
            {"gold loss": [(0, 1.0), (1, float("nan"))]}, title="t", x_label="x", y_label="y"
        )


def test_infinity_is_refused() -> None:
    with pytest.raises(ValueError, match="finite"):
        line_chart({"a": [(float("inf"), 1.0)]}, title="t", x_label="x", y_label="y")


def test_inverted_y_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="y_min"):
        line_chart({"a": [(0, 1.0)]}, title="t", x_label="x", y_label="y", y_min=1.0, y_max=0.0)


def test_whole_number_x_gets_whole_number_ticks() -> None:
    root = _chart({"a": [(0, 1.0), (1, 2.0)]})

    x_ticks = [el.text for el in root.iter("text") if el.get("text-anchor") == "middle"]

    assert "0" in x_ticks
    assert "1" in x_ticks
    assert not any(re.fullmatch(r"0\.\d+", t or "") for t in x_ticks)


def test_fixed_y_bounds_are_axis_ends() -> None:
    root = _chart({"a": [(0, 0.3), (1, 0.4)]}, y_min=0.0, y_max=1.0)

    texts = _texts(root)

    assert "0.0" in texts
    assert "1.0" in texts


def _numeric(root: ET.Element) -> list[float]:
    numbers = []
    for text in _texts(root):
        try:
            numbers.append(float(text))
        except ValueError:
            continue
    return numbers


def test_point_outside_fixed_bounds_widens_the_axis() -> None:
    root = _chart({"a": [(0, 0.5), (1, 1.7)]}, y_min=0.0, y_max=1.0)

    assert max(_numeric(root)) >= 1.7


def test_series_names_and_title_are_escaped() -> None:
    name = "<script>alert(1)</script>"

    svg = line_chart({name: [(0, 1.0)]}, title='a "b" & c', x_label="x", y_label="y")

    root = ET.fromstring(svg)
    legend = next(g for g in root.iter("g") if g.get("class") == "legend-entry")
    assert "<script" not in svg
    assert legend.find("title").text == name  # type: ignore[union-attr]
    assert root.find("title").text == 'a "b" & c'  # type: ignore[union-attr]


def test_many_series_make_room_for_the_legend() -> None:
    series = {f"site-{i}": [(0, float(i)), (1, float(i + 1))] for i in range(30)}

    root = _chart(series)

    assert float(root.attrib["height"]) >= 30 * 18
    assert all(math.isfinite(v) for v in _coordinates(root))


def test_escape_text_replaces_controls_and_bidi_overrides() -> None:
    assert escape_text("a\x00b\u202ec\ud800d") == "a\ufffdb\ufffdc\ufffdd"


def test_escape_text_escapes_markup_and_quotes() -> None:
    assert escape_text("<a href=\"x\">'&'</a>") == (
        "&lt;a href=&quot;x&quot;&gt;&#x27;&amp;&#x27;&lt;/a&gt;"
    )


def _marker_x(root: ET.Element) -> list[list[float]]:
    """Each series' marker x positions (circles and squares), in series order."""
    series = []
    for group in root.iter("g"):
        if group.get("class") != "series":
            continue
        xs = [float(c.get("cx", "nan")) for c in group.iter("circle")]
        xs += [float(r.get("x", "nan")) + 3.5 for r in group.iter("rect")]
        series.append(xs)
    return series


def test_coinciding_series_are_shifted_apart_so_both_show() -> None:
    root = _chart({"accuracy": [(0, 0.0), (1, 0.0)], "category": [(0, 0.0), (1, 0.0)]})

    first, second = _marker_x(root)

    assert all(abs(a - b) >= 3 for a, b in zip(first, second, strict=True))
    assert "shifted sideways" in (root.find("desc").text or "")  # type: ignore[union-attr]


def test_distinct_series_are_not_shifted() -> None:
    root = _chart({"a": [(0, 1.0), (1, 2.0)], "b": [(0, 3.0), (1, 4.0)]})

    first, second = _marker_x(root)

    assert first == second


def test_y_axis_starts_at_zero_so_a_small_change_stays_small() -> None:
    root = _chart({"gold loss": [(0, 2.345), (1, 2.333)]})

    assert "0.0" in _texts(root) or "0" in _texts(root)
    assert "axis cut" not in " ".join(_texts(root))


def test_an_axis_that_does_not_reach_zero_is_marked_cut() -> None:
    svg = line_chart(
        {"gold loss": [(0, 2.345), (1, 2.333)]},
        title="Loss",
        x_label="round",
        y_label="loss",
        y_from_zero=False,
    )
    root = ET.fromstring(svg)

    assert "loss (axis cut)" in _texts(root)
    assert any(el.get("class") == "axis-cut" for el in root.iter("line"))
