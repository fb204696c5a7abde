"""moealign.tables: number formats worked by hand, and one table rendered three ways."""

from __future__ import annotations

import math
from html.parser import HTMLParser

import pytest

from moealign.tables import (
    Cell,
    Table,
    format_interval,
    format_number,
    to_html,
    to_markdown,
    to_text,
)


@pytest.mark.parametrize(
    ("mean", "half_width", "signed", "expected"),
    [
        (3.694, 0.2087, False, "3.69 ± 0.21"),  # half width 2 significant digits, mean to 0.01
        (0.3323, 0.08386, True, "+0.332 ± 0.084"),
        (553.4, 0.0996, False, "553.40 ± 0.10"),  # 0.0996 rounds up to 0.10: two places
        (16692, 94784, False, "17,000 ± 95,000"),  # rounded to thousands, with separators
        (12345.678, 0.123, False, "12,345.68 ± 0.12"),
        (-0.2359, 24.03, True, "+0 ± 24"),  # rounds to zero: no sign of its own
        (-0.0001, 0.5, False, "0.00 ± 0.50"),
        (-1.25, 0.5, True, "-1.25 ± 0.50"),
        (0.0, 0.0, False, "0 ± 0"),  # every seed gave the same value
        (553.4, 0.0, False, "553.4 ± 0"),
        (0.20000000000000004, 8.4e-17, False, "0.2 ± 0"),  # rounding error of equal values
        (1.5, math.nan, False, "1.5"),  # one seed: no interval
        (2.0, None, True, "+2"),
        (math.nan, 0.1, False, "–"),
    ],
)
def test_interval_precision_follows_the_half_width(mean, half_width, signed, expected):
    assert format_interval(mean, half_width, signed) == expected


@pytest.mark.parametrize(
    ("value", "signed", "expected"),
    [
        (3.14159, False, "3.142"),
        (16692.4, False, "16,692"),
        (1e6, True, "+1,000,000"),
        (-0.25, True, "-0.25"),
        (-0.0, True, "+0"),
        (1.234e-5, False, "1.234e-05"),
        (math.inf, False, "–"),
        (None, False, "–"),
    ],
)
def test_single_values(value, signed, expected):
    assert format_number(value, signed=signed) == expected


TABLE = Table(
    ["variant", Cell("val loss ↓", title="val_loss"), "n"],
    [
        ["a|b", Cell("3.3 ± 0.2", "strong"), "2"],
        ["<c>", Cell("3.5 ± 0.4", "em", title="within noise"), "10"],
        ["d", "–", "1,000"],
    ],
)


def test_markdown_escapes_pipes_marks_emphasis_and_right_aligns_numbers():
    assert to_markdown(TABLE).splitlines() == [
        "| variant | val loss ↓ | n |",
        "|---|---:|---:|",
        "| a\\|b | **3.3 ± 0.2** | 2 |",
        "| <c> | *3.5 ± 0.4* | 10 |",
        "| d | – | 1,000 |",
    ]


def test_text_pads_columns_to_their_widest_cell():
    assert to_text(TABLE).splitlines() == [
        "variant  val loss ↓      n",
        "-------  ----------  -----",
        "a|b       3.3 ± 0.2      2",
        "<c>       3.5 ± 0.4     10",
        "d                 –  1,000",
    ]
    headerless = Table([], [("run directory", "runs/x"), ("steps", "3 / 4")], align="ll")
    assert to_text(headerless, indent="  ") == "  run directory  runs/x\n  steps          3 / 4"


class _Cells(HTMLParser):
    """(tag, attributes, text) of every th/td, and the elements that enclose the table."""

    def __init__(self) -> None:
        super().__init__()
        self.cells, self.stack, self.outer = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag in ("th", "td"):
            self.cells.append((tag, dict(attrs), ""))
        elif not self.cells:
            self.outer.append((tag, dict(attrs)))

    def handle_data(self, data):
        if self.cells:
            tag, attrs, text = self.cells[-1]
            self.cells[-1] = (tag, attrs, text + data)


def test_html_scrolls_inside_its_container_and_keeps_tooltips():
    parser = _Cells()
    parser.feed(to_html(TABLE))
    assert parser.outer[0] == ("div", {"class": "table-scroll"})
    tags = [
        (tag, attrs.get("class"), attrs.get("title"), text) for tag, attrs, text in parser.cells
    ]
    assert tags[:3] == [
        ("th", None, None, "variant"),
        ("th", "num", "val_loss", "val loss ↓"),
        ("th", "num", None, "n"),
    ]
    assert tags[3:6] == [
        ("td", None, None, "a|b"),
        ("td", "num", None, "3.3\xa0±\xa00.2"),
        ("td", "num", None, "2"),
    ]
    assert tags[6] == ("td", None, None, "<c>")  # escaped on the way in, text on the way out
    assert tags[7] == ("td", "num", "within noise", "3.5\xa0±\xa00.4")
    assert "<strong>3.3&nbsp;±&nbsp;0.2</strong>" in to_html(TABLE)
    assert "<em>3.5&nbsp;±&nbsp;0.4</em>" in to_html(TABLE)


def test_bad_tables_are_refused():
    with pytest.raises(ValueError, match="one row length"):
        Table(["a", "b"], [["1"]])
    with pytest.raises(ValueError, match="align"):
        Table(["a"], [["1"]], align="c")
