"""The ablation table of docs/roma_study.md from ``moealign roma`` results directories.

The reference is the main study (default RoMA: last 5 MoE layers, last token, kNN k = 3,
manifold regulariser); each ablation directory holds a RoMA-only run (``methods = ["roma"]``)
on the same base with one override. Accuracy cells are mean ± 95% Student-t half width over
seeds (``moealign.evaluation.stats.mean_confidence_interval``); the difference to default RoMA is
paired by seed (same training draws; ``moealign.evaluation.verdicts.paired_comparison``), in
points, with its raw and Holm p (the table's tests are one family) and the outcome: lower /
higher / equivalent within ±1 point (TOST) / inconclusive.

    PYTHONPATH=src python3 scripts/roma_ablation_summary.py MAIN_DIR "NAME=ABLATION_DIR" ...

(the text after the last "=" is the directory; the name may itself hold "=").
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from moealign.evaluation.stats import mean_confidence_interval
from moealign.evaluation.verdicts import judged_rows, paired_comparison
from moealign.io import read_json
from moealign.tables import Table, to_markdown

SETS = ("seen", "heldout")
MARGIN_POINTS = 1.0  # equivalence margin: 1 accuracy point


def roma_accuracy(results_dir: Path) -> dict[str, dict[str, float]]:
    """Per set, per seed: RoMA's macro accuracy in ``results_dir/results.json``."""
    results = read_json(results_dir / "results.json")
    by_seed = results["summary"]["accuracy"]["roma"]
    seeds = [str(s) for s in results["config"]["seeds"]]
    return {name: dict(zip(seeds, by_seed[name]["per_seed"], strict=True)) for name in SETS}


def _points(value: float, half_width: float, signed: bool = False) -> str:
    text = f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"
    return text + (f" ± {100 * half_width:.1f}" if math.isfinite(half_width) else "")


def ablation_table(
    reference: dict[str, dict[str, float]], variants: dict[str, dict[str, dict[str, float]]]
) -> Table:
    """Columns: variant | seen | Δ seen | held-out | Δ held-out | seeds."""
    rows = []
    for name, accuracy in {"default (main study)": reference, **variants}.items():
        cells = []
        for set_name in SETS:
            seeds = sorted(accuracy[set_name])
            values = [accuracy[set_name][s] for s in seeds]
            mean, half_width, _ = mean_confidence_interval(values)
            cells.append(_points(mean, half_width))
            if accuracy is reference:
                cells.append("—")
            elif len(seeds) >= 2:
                cells.append(
                    paired_comparison(
                        [100 * v for v in values],
                        [100 * reference[set_name][s] for s in seeds],
                        MARGIN_POINTS,
                    )
                )
            else:
                cells.append(_points(values[0] - reference[set_name][seeds[0]], math.nan, True))
        rows.append([name, *cells, str(len(seeds))])
    header = ["RoMA variant", "seen", "Δ seen vs default", "held-out", "Δ held-out vs default"]
    return Table([*header, "seeds"], judged_rows(rows))


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not all("=" in a for a in argv[1:]):
        print(__doc__, file=sys.stderr)
        return 2
    reference = roma_accuracy(Path(argv[0]))
    variants = {}
    for item in argv[1:]:
        name, directory = item.rsplit("=", 1)
        variants[name] = roma_accuracy(Path(directory))
    print(to_markdown(ablation_table(reference, variants)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
