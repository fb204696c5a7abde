"""Re-test the paired differences a study document prints, in the four outcomes.

Where a study's per-seed results are not in the repository, its Markdown tables still hold each
paired difference as ``Δ ± h`` (mean over seeds ± 95% Student-t half width, n seeds, default
3). From them ``se = h / t_{0.975, n−1}`` and :func:`moealign.evaluation.verdicts.
interval_comparison` give the two-sided p, the TOST p against a margin and the outcome; every
table is one Holm family (``moealign.evaluation.verdicts.holm``). The values in the document are
rounded, so the recomputed p-values differ from the printed ones in the last digit or so.

A cell counts when it is ``Δ ± h`` followed by a p-value (``(p=0.16)``, ``, p = 0.20``), or sits
in a column whose header starts with "Δ". ``--margin WORDS=M`` sets the equivalence margin of
cells whose row label, column header or left neighbour's header contains WORDS (first match).

    PYTHONPATH=src python3 scripts/restate_claims.py docs/mpi_study.md --margin "val loss=0.01"
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from pathlib import Path

from scipy import stats as scipy_stats

from moealign.evaluation.verdicts import Comparison, format_p, holm, interval_comparison

CELL = re.compile(
    r"^(?P<delta>[+\-−]?\d[\d,]*(?:\.\d+)?) ± (?P<half>\d[\d,]*(?:\.\d+)?)"
    r"(?:,? \(?p ?= ?(?P<p>nan|n/a|[\d.]+)(?:, n=(?P<n>\d+))?\)?)?(?: \(n=(?P<n2>\d+)\))?"
)


@dataclass
class Test:
    heading: str
    row: str
    column: str
    delta: float
    half_width: float
    n: int
    margin: float | None
    comparison: Comparison | None = None


def _number(text: str) -> float:
    return float(text.replace("−", "-").replace(",", ""))


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _margin(texts: list[str], margins: list[tuple[str, float]]) -> float | None:
    joined = " ".join(texts).lower()
    return next((m for words, m in margins if words.lower() in joined), None)


def tables(text: str) -> list[tuple[str, list[list[str]]]]:
    """(nearest heading above, rows including the header row) of each Markdown table."""
    found, heading, rows = [], "", []
    for line in [*text.splitlines(), ""]:
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.startswith("|"):
            if not re.fullmatch(r"\|?[\s|:-]+\|?", line):
                rows.append(_cells(line))
        elif rows:
            found.append((heading, rows))
            rows = []
    return found


def table_tests(
    heading: str, rows: list[list[str]], margins: list[tuple[str, float]], seeds: int
) -> list[Test]:
    """The paired differences of one table (module doc), Holm-adjusted as one family."""
    header, found = rows[0], []
    for row in rows[1:]:
        for index, cell in enumerate(row):
            match = CELL.match(cell)
            column = header[index] if index < len(header) else ""
            if not match or not (match["p"] or column.startswith("Δ")):
                continue
            left = header[index - 1] if index > 0 else ""
            n = int(match["n"] or match["n2"] or seeds)
            found.append(
                Test(
                    heading,
                    row[0],
                    column,
                    _number(match["delta"]),
                    _number(match["half"]),
                    n,
                    _margin([row[0], column, left], margins),
                )
            )
    comparisons = []
    for test in found:
        standard_error = test.half_width / scipy_stats.t.ppf(0.975, test.n - 1)
        comparisons.append(interval_comparison(test.delta, standard_error, test.n, test.margin))
    for test, comparison in zip(found, holm(comparisons), strict=True):
        test.comparison = comparison
    return found


def report(path: Path, margins: list[tuple[str, float]], seeds: int) -> str:
    lines = [f"# {path}: paired differences in four outcomes (Holm per table)", ""]
    for heading, rows in tables(path.read_text()):
        tests = table_tests(heading, rows, margins, seeds)
        if not tests:
            continue
        family = tests[0].comparison.family  # the cells with a p-value (Holm's family)
        lines += [f"## {heading} ({len(tests)} differences, {family} with a p-value)", ""]
        for test in tests:
            c = test.comparison
            margin = "no margin" if test.margin is None else f"±{test.margin:g}"
            tost = "" if math.isnan(c.p_equivalence) else f", TOST {format_p(c.p_equivalence)}"
            lines.append(
                f"- {test.row} / {test.column}: {test.delta:+g} ± {test.half_width:g} (n={test.n})"
                f" → {format_p(c.p_value)}, Holm {format_p(c.p_adjusted)}{tost} ({margin}): "
                f"**{c.describe()}**"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("document", type=Path)
    parser.add_argument(
        "--margin",
        action="append",
        default=[],
        metavar="WORDS=M",
        help="equivalence margin of cells whose labels contain WORDS (repeatable)",
    )
    parser.add_argument("--seeds", type=int, default=3, help="n where a cell does not say")
    args = parser.parse_args()
    margins = []
    for item in args.margin:
        words, _, value = item.rpartition("=")
        margins.append((words, float(value)))
    print(report(args.document, margins, args.seeds))


if __name__ == "__main__":
    main()
