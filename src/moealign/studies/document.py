"""A small document model rendered twice: to Markdown and to one self-contained HTML page.

A report is a list of :class:`Section` s holding blocks: :class:`Paragraph`, :class:`Note`
(a one-line remark, e.g. why a section is left out), :class:`Table` (:mod:`moealign.tables`,
the one table renderer; in HTML it scrolls sideways inside the page when wider than it),
:class:`Image` (a PNG file; Markdown links it, HTML inlines it as base64), :class:`Code`,
:class:`Formula` (MathML in HTML, LaTeX math in Markdown) and :class:`Details` (blocks folded
under a one-line summary: ``<details>``, closed until clicked).
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from moealign import tables
from moealign.tables import Cell, Table

__all__ = [
    "Cell",
    "Code",
    "Details",
    "Formula",
    "Image",
    "Note",
    "Paragraph",
    "Section",
    "Table",
    "to_html",
    "to_markdown",
]


@dataclass
class Paragraph:
    text: str


@dataclass
class Note:
    text: str


@dataclass
class Image:
    path: Path
    caption: str


@dataclass
class Code:
    text: str
    language: str = ""


@dataclass
class Formula:
    """A displayed equation: ``mathml`` (the content of a ``<math>`` element, rendered by the
    browser) and ``latex`` (Markdown's ``$$ ... $$`` math, as GitHub renders it)."""

    mathml: str
    latex: str


@dataclass
class Details:
    """``blocks`` folded under ``summary`` (HTML ``<details>``; Markdown has the same element)."""

    summary: str
    blocks: list[Paragraph | Note | Table | Image | Code | Formula]


Block = Paragraph | Note | Table | Image | Code | Formula | Details


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)
    level: int = 2


def _markdown_block(block: Block, base_dir: Path) -> str:
    if isinstance(block, Paragraph):
        return block.text
    if isinstance(block, Note):
        return f"*{block.text}*"
    if isinstance(block, Table):
        return tables.to_markdown(block)
    if isinstance(block, Image):
        link = Path(os.path.relpath(block.path, base_dir)).as_posix()
        return f"![{block.caption}]({link})\n\n*{block.caption}*"
    if isinstance(block, Formula):
        return f"$$\n{block.latex}\n$$"
    if isinstance(block, Details):
        inner = "\n\n".join(_markdown_block(b, base_dir) for b in block.blocks)
        return f"<details><summary>{html.escape(block.summary)}</summary>\n\n{inner}\n\n</details>"
    return f"```{block.language}\n{block.text.rstrip()}\n```"


def to_markdown(title: str, sections: Sequence[Section], base_dir: Path) -> str:
    """Markdown text; image links are relative to ``base_dir`` (where the file is written)."""
    parts = [f"# {title}"]
    for section in sections:
        parts.append(f"{'#' * section.level} {section.title}")
        parts += [_markdown_block(block, base_dir) for block in section.blocks]
    return "\n\n".join(parts) + "\n"


def _html_block(block: Block) -> str:
    if isinstance(block, Paragraph):
        return f"<p>{html.escape(block.text)}</p>"
    if isinstance(block, Note):
        return f'<p class="note">{html.escape(block.text)}</p>'
    if isinstance(block, Table):
        return tables.to_html(block)
    if isinstance(block, Image):
        data = base64.b64encode(block.path.read_bytes()).decode("ascii")
        caption = html.escape(block.caption)
        return (
            f'<figure><img src="data:image/png;base64,{data}" alt="{caption}">'
            f"<figcaption>{caption}</figcaption></figure>"
        )
    if isinstance(block, Formula):
        return f'<math display="block">{block.mathml}</math>'
    if isinstance(block, Details):
        inner = "".join(_html_block(b) for b in block.blocks)
        return f"<details><summary>{html.escape(block.summary)}</summary>{inner}</details>"
    return f"<pre><code>{html.escape(block.text.rstrip())}</code></pre>"


_STYLE = (
    """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em;
       color: #222; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
figure { margin: 1em 0; } img { max-width: 100%; height: auto; }
figcaption, .note { color: #666; font-style: italic; }
details { margin: 0.5em 0; } summary { cursor: pointer; color: #444; }
math[display="block"] { margin: 0.6em 0; font-size: 1.1em; }
"""
    + tables.TABLE_CSS
)


def to_html(title: str, sections: Sequence[Section]) -> str:
    """One HTML page with every image inlined (no files beside it needed)."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for section in sections:
        level = min(section.level, 6)
        parts.append(f"<h{level}>{html.escape(section.title)}</h{level}>")
        parts += [_html_block(block) for block in section.blocks]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
