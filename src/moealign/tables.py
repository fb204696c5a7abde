"""Tables: one model, one renderer for Markdown, HTML and the terminal, and the number formats.

A :class:`Table` holds header and body cells, each a string or a :class:`Cell` (text with an
optional emphasis and a tooltip). :func:`to_markdown`, :func:`to_html` and :func:`to_text`
render it; a column whose cells are all numbers is right-aligned. :func:`format_number` writes
one value and :func:`format_interval` a mean with its interval half width, at a precision
chosen from that width. Standard library only, so every layer (the CLI, evaluation, studies,
RoMA, scripts) can import it without loading torch or matplotlib.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "TABLE_CSS",
    "Cell",
    "Table",
    "format_interval",
    "format_number",
    "to_html",
    "to_markdown",
    "to_text",
]

Emphasis = Literal["", "strong", "em"]


@dataclass(frozen=True)
class Cell:
    """A cell's ``text``; ``emphasis`` "strong" (bold) or "em" (italic); ``title`` a tooltip
    (the HTML ``title`` attribute, e.g. the raw metric key behind a human-readable header; the
    other formats leave it out)."""

    text: str
    emphasis: Emphasis = ""
    title: str = ""

    def __str__(self) -> str:
        return self.text


@dataclass
class Table:
    """``headers`` (empty: no header row) and ``rows`` of strings or :class:`Cell` s.

    ``align`` gives one letter per column, ``l`` or ``r``; empty: columns whose non-blank
    cells all start with a number are right-aligned, the others left-aligned.
    """

    headers: Sequence[str | Cell]
    rows: Sequence[Sequence[str | Cell]]
    align: str = ""
    n_columns: int = field(init=False)

    def __post_init__(self) -> None:
        widths = {len(row) for row in self.rows} | ({len(self.headers)} if self.headers else set())
        if len(widths) > 1:
            raise ValueError(f"table rows: got {sorted(widths)} cells; expected one row length")
        self.n_columns = widths.pop() if widths else 0
        if self.align and (len(self.align) != self.n_columns or set(self.align) - {"l", "r"}):
            raise ValueError(f"align: got {self.align!r}; expected one of l/r per column")

    def alignment(self) -> str:
        """One of ``l``/``r`` per column (``align``, or numbers right and text left)."""
        if self.align:
            return self.align
        return "".join(
            "r" if _is_numeric_column([str(row[c]) for row in self.rows]) else "l"
            for c in range(self.n_columns)
        )


_NUMBER_START = re.compile(r"^[-+−]?(\d|\.\d)")
_BLANK = {"", "–", "—", "-", "n/a"}


def _is_numeric_column(texts: Sequence[str]) -> bool:
    filled = [t.strip() for t in texts if t.strip() not in _BLANK]
    return bool(filled) and all(_NUMBER_START.match(t) for t in filled)


def _cell(value: str | Cell) -> Cell:
    return value if isinstance(value, Cell) else Cell(str(value))


# ---------------------------------------------------------------------- numbers


def _fix_zero(text: str) -> str:
    """``-0``, ``-0.00`` (a value that rounds to zero) without its sign."""
    return text[1:] if re.fullmatch(r"-0(\.0*)?", text) else text


def _fixed(value: float, decimals: int, signed: bool) -> str:
    """``value`` at ``decimals`` decimal places (negative: rounded to tens, hundreds, ...),
    with thousands separators."""
    if decimals < 0:
        value, decimals = round(value, decimals), 0
    text = _fix_zero(f"{value:,.{decimals}f}")
    return ("+" + text if not text.startswith("-") else text) if signed else text


_RELATIVE_ZERO = 1e-9


def format_number(value: float | None, digits: int = 4, signed: bool = False) -> str:
    """``value`` at ``digits`` significant digits; from 1000 on a whole number with thousands
    separators (``16,692``); ``–`` when missing or not finite; ``signed`` writes ``+`` too."""
    if value is None or not math.isfinite(value):
        return "–"
    if abs(value) >= 1000:
        return _fixed(value, 0, signed)
    text = _fix_zero(f"{value:.{digits}g}")
    return ("+" + text if not text.startswith("-") else text) if signed else text


def format_interval(mean: float, half_width: float | None, signed: bool = False) -> str:
    """``mean ± half width``: the half width to 2 significant digits and the mean to the same
    decimal place (``3.69 ± 0.21``, ``17,000 ± 95,000``).

    Without a finite half width (one seed) the mean alone (:func:`format_number`); a zero half
    width (every seed gave the same value; below 1e-9 of the mean counts as zero, the rounding
    error of equal values) is written ``± 0`` after the mean at 4 significant digits.
    ``signed`` writes the mean's ``+`` too (differences).
    """
    if not math.isfinite(mean):
        return "–"
    if half_width is None or not math.isfinite(half_width):
        return format_number(mean, signed=signed)
    if abs(half_width) <= _RELATIVE_ZERO * abs(mean):
        # Zero, or rounding error of equal values (mean 0.20000000000000004, s ~ 1e-17).
        return f"{format_number(mean, signed=signed)} ± 0"
    decimals = 1 - math.floor(math.log10(abs(half_width)))
    # Rounding may carry into a new digit (0.0996 -> 0.100): take the places of the rounded one.
    decimals = 1 - math.floor(math.log10(abs(round(half_width, decimals))))
    return f"{_fixed(mean, decimals, signed)} ± {_fixed(abs(half_width), decimals, False)}"


# ---------------------------------------------------------------------- renderers


def _markdown_text(cell: Cell) -> str:
    text = cell.text.replace("|", "\\|").replace("\n", " ")
    if text and cell.emphasis == "strong":
        return f"**{text}**"
    if text and cell.emphasis == "em":
        return f"*{text}*"
    return text


def to_markdown(table: Table) -> str:
    """A GitHub-flavoured Markdown table (an empty header row where ``headers`` is empty)."""
    headers = table.headers or [""] * table.n_columns
    rule = {"l": "---", "r": "---:"}
    lines = [
        "| " + " | ".join(_markdown_text(_cell(h)) for h in headers) + " |",
        "|" + "|".join(rule[a] for a in table.alignment()) + "|",
    ]
    for row in table.rows:
        lines.append("| " + " | ".join(_markdown_text(_cell(c)) for c in row) + " |")
    return "\n".join(lines)


def _html_cell(tag: str, cell: Cell, align: str) -> str:
    # An interval "m ± h" never breaks across lines; a cell may break elsewhere (before "(p=").
    text = html.escape(cell.text).replace(" ± ", "&nbsp;±&nbsp;")
    if cell.emphasis:
        text = f"<{cell.emphasis}>{text}</{cell.emphasis}>"
    attributes = ' class="num"' if align == "r" else ""
    if cell.title:
        attributes += f' title="{html.escape(cell.title)}"'
    return f"<{tag}{attributes}>{text}</{tag}>"


TABLE_CSS = """
.table-scroll { overflow-x: auto; max-width: 100%; margin: 1em 0; }
.table-scroll table { border-collapse: collapse; font-size: 0.9em; }
.table-scroll th, .table-scroll td { border: 1px solid #ccc; padding: 0.3em 0.6em;
  text-align: left; vertical-align: top; }
.table-scroll th { background: #f3f3f3; }
.table-scroll th[title] { text-decoration: underline dotted #999; cursor: help; }
.table-scroll .num { text-align: right; font-variant-numeric: tabular-nums; }
.table-scroll td:first-child, .table-scroll th:first-child { position: sticky; left: 0;
  background: #fff; }
.table-scroll th:first-child { background: #f3f3f3; }
"""


def to_html(table: Table) -> str:
    """The table inside a ``div.table-scroll`` that scrolls sideways when the table is wider
    than the page (style: :data:`TABLE_CSS`)."""
    align = table.alignment()
    parts = ['<div class="table-scroll"><table>']
    if table.headers:
        cells = (_html_cell("th", _cell(h), a) for h, a in zip(table.headers, align, strict=True))
        parts.append(f"<thead><tr>{''.join(cells)}</tr></thead>")
    parts.append("<tbody>")
    for row in table.rows:
        cells = (_html_cell("td", _cell(c), a) for c, a in zip(row, align, strict=True))
        parts.append(f"<tr>{''.join(cells)}</tr>")
    parts.append("</tbody></table></div>")
    return "".join(parts)


def to_text(table: Table, indent: str = "") -> str:
    """Plain text for the terminal: columns padded to their widest cell, two spaces apart,
    the header underlined with dashes; emphasis and tooltips are left out."""
    align = table.alignment()
    texts = [[str(c) for c in row] for row in table.rows]
    headers = [str(h) for h in table.headers]
    widths = [
        max(len(r[c]) for r in ([headers] if headers else []) + texts) for c in range(len(align))
    ]

    def line(cells: Sequence[str]) -> str:
        padded = (
            cell.rjust(w) if a == "r" else cell.ljust(w)
            for cell, w, a in zip(cells, widths, align, strict=True)
        )
        return (indent + "  ".join(padded)).rstrip()

    lines = [line(row) for row in texts]
    if headers:
        lines[:0] = [line(headers), indent + "  ".join("-" * w for w in widths)]
    return "\n".join(lines)
