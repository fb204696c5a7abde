"""A small document model rendered twice: to Markdown and to one self-contained HTML page.

A report is a list of :class:`Section` s holding blocks: :class:`Paragraph`, :class:`Note`
(a one-line remark, e.g. why a section is left out), :class:`Table` (with cells to emphasise),
:class:`Image` (a PNG file; Markdown links it, HTML inlines it as base64) and :class:`Code`.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Code", "Image", "Note", "Paragraph", "Section", "Table", "to_html", "to_markdown"]


@dataclass
class Paragraph:
    text: str


@dataclass
class Note:
    text: str


@dataclass
class Table:
    """``bold`` holds (row, column) indices of cells to emphasise (e.g. the best value)."""

    headers: list[str]
    rows: list[list[str]]
    bold: set[tuple[int, int]] = field(default_factory=set)


@dataclass
class Image:
    path: Path
    caption: str


@dataclass
class Code:
    text: str
    language: str = ""


Block = Paragraph | Note | Table | Image | Code


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)
    level: int = 2


def _markdown_cell(text: str, bold: bool) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return f"**{text}**" if bold and text else text


def _markdown_block(block: Block, base_dir: Path) -> str:
    if isinstance(block, Paragraph):
        return block.text
    if isinstance(block, Note):
        return f"*{block.text}*"
    if isinstance(block, Table):
        lines = [
            "| " + " | ".join(_markdown_cell(h, False) for h in block.headers) + " |",
            "|" + "|".join("---" for _ in block.headers) + "|",
        ]
        for r, row in enumerate(block.rows):
            cells = (_markdown_cell(text, (r, c) in block.bold) for c, text in enumerate(row))
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)
    if isinstance(block, Image):
        link = Path(os.path.relpath(block.path, base_dir)).as_posix()
        return f"![{block.caption}]({link})\n\n*{block.caption}*"
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
        head = "".join(f"<th>{html.escape(h)}</th>" for h in block.headers)
        body = []
        for r, row in enumerate(block.rows):
            cells = []
            for c, text in enumerate(row):
                text = html.escape(text)
                cells.append(
                    f"<td><strong>{text}</strong></td>"
                    if (r, c) in block.bold
                    else f"<td>{text}</td>"
                )
            body.append("<tr>" + "".join(cells) + "</tr>")
        return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    if isinstance(block, Image):
        data = base64.b64encode(block.path.read_bytes()).decode("ascii")
        caption = html.escape(block.caption)
        return (
            f'<figure><img src="data:image/png;base64,{data}" alt="{caption}">'
            f"<figcaption>{caption}</figcaption></figure>"
        )
    return f"<pre><code>{html.escape(block.text.rstrip())}</code></pre>"


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
th { background: #f3f3f3; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
figure { margin: 1em 0; } img { max-width: 100%; }
figcaption, .note { color: #666; font-style: italic; }
"""


def to_html(title: str, sections: Sequence[Section]) -> str:
    """One HTML page with every image inlined (no files beside it needed)."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for section in sections:
        level = min(section.level, 6)
        parts.append(f"<h{level}>{html.escape(section.title)}</h{level}>")
        parts += [_html_block(block) for block in section.blocks]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
