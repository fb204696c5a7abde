"""The expert compression study (docs/compression_study.md): compress every base run of
``moealign ablate configs/compression_study.toml`` and tabulate the retention.

For each finished base cell ``<variant>__seed<s>`` (``unaligned``/``aligned``), each method and
each E′ in ``--keep`` (default 6 and 4 of 8: 25% and 50% fewer experts), the base is compressed
with :func:`moealign.compression.command.compress_source` (the code path of ``moealign
compress``; calibration: the first ``--calib-tokens`` tokens of the run's training stream) into
``<study>/compressed/<cell>/<method>_e<E′>``, a full run directory with ``compression.json``.
A compression whose ``compression.json`` exists is not redone, so an interrupted study resumes.

Tables (markdown, also written to ``<study>/compression_summary.md``; the numbers to
``<study>/compression_summary.json``): the bases' metrics, mean ± 95% Student-t half width over
seeds (``moealign.evaluation.stats.interval_text``); each retention ratio per base variant as
the geometric mean over seeds with the exponentiated t interval of the mean log ratio
(``moealign.compression.retention.ratio_text``: always positive); and paired by seed on the log
ratio (``moealign.evaluation.verdicts.paired_comparison``, margin ±0.01 ≈ ±1%, Holm over each
table's tests, four outcomes) the aligned − unaligned difference and every pair of methods on
the same base cells. ``--task-examples`` evaluates more
task-suite examples than the runs' own ``train.task_eval_examples``; ``--cells`` compresses
only the named bases (to split the work over processes; tabulate afterwards with
``--summary-only``).

    PYTHONPATH=src nice -n 15 python3 scripts/compression_study.py runs/compression_study_v2 \
        --task-examples 150
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from moealign.compression import METHODS
from moealign.compression.command import TRAINING_DATA, compress_source
from moealign.compression.retention import ratio_text
from moealign.compression.runs import REPORT_FILE, RunSource
from moealign.config import CompressionConfig
from moealign.evaluation.stats import interval_text as interval
from moealign.evaluation.verdicts import Comparison, judged_rows, outcome_legend, paired_comparison
from moealign.tables import Table, format_number, to_markdown
from moealign.training.runs import FINAL_EVAL_FILE

VARIANTS = ("unaligned", "aligned")
CELL = re.compile(r"^(?P<variant>\w+)__seed(?P<seed>\d+)$")
QUALITY = ("val_loss", "val_perplexity", "task_accuracy_seen", "task_accuracy_heldout")
RATIOS = (
    ("val_loss", "val loss ×"),
    ("val_perplexity", "perplexity ×"),
    ("task_accuracy_seen", "seen acc ×"),
    ("task_accuracy_heldout", "held-out acc ×"),
    ("params_total", "params ×"),
    ("tokens_per_s", "tokens/s ×"),
)
# Equivalence margin of a difference of log retention ratios: ±0.01 ≈ ±1% of the ratio.
LOG_RATIO_MARGIN = 0.01


def base_cells(study: Path) -> list[Path]:
    return sorted(
        path
        for path in study.iterdir()
        if CELL.match(path.name) and (path / FINAL_EVAL_FILE).is_file()
    )


def compress_all(
    study: Path,
    keeps: Sequence[int],
    calib_tokens: int,
    cells: Sequence[str] = (),
    task_examples: int | None = None,
) -> None:
    for cell in base_cells(study):
        if cells and cell.name not in cells:
            continue
        source = original = None
        for method in METHODS:
            for keep in keeps:
                out = study / "compressed" / cell.name / f"{method}_e{keep}"
                if (out / REPORT_FILE).is_file():
                    continue
                if source is None:
                    source = RunSource.open(cell)
                    if task_examples is not None:  # evaluate (and record) more task examples
                        train = replace(source.config.train, task_eval_examples=task_examples)
                        source.config = replace(source.config, train=train)
                    original = source.evaluate(source.model)
                out.parent.mkdir(parents=True, exist_ok=True)
                start = time.perf_counter()
                record = CompressionConfig(
                    method=method,
                    source=str(cell.resolve()),
                    keep_experts=keep,
                    calibration=TRAINING_DATA,
                    calibration_tokens=calib_tokens,
                )
                report = compress_source(source, out, record, original)
                ratio = report["retention"]["val_loss"]
                seconds = time.perf_counter() - start
                print(f"{cell.name} {method} E'={keep}: val loss × {ratio:.3f} ({seconds:.0f} s)")


def load_reports(study: Path) -> list[dict]:
    rows = []
    for report_file in sorted((study / "compressed").glob(f"*/*/{REPORT_FILE}")):
        match = CELL.match(report_file.parent.parent.name)
        report = json.loads(report_file.read_text())
        rows.append(
            {
                "variant": match["variant"],
                "seed": int(match["seed"]),
                "method": report["compression"]["method"],
                "keep": report["compression"]["keep_experts"],
                **report,
            }
        )
    return rows


def select(rows: list[dict], **fields) -> list[dict]:
    chosen = [r for r in rows if all(r[k] == v for k, v in fields.items())]
    return sorted(chosen, key=lambda r: r["seed"])


def base_table(rows: list[dict]) -> Table:
    """Per base variant: the originals' metrics, mean ± 95% t half width over seeds."""
    body = []
    for variant in VARIANTS:
        originals = list({r["seed"]: r["original"] for r in select(rows, variant=variant)}.values())
        if originals:
            cells = [interval([v[key] for v in originals]) for key in (*QUALITY, "tokens_per_s")]
            params = format_number(originals[0]["params_total"])
            body.append([variant, str(len(originals)), *cells[:-1], params, cells[-1]])
    headers = ["base", "seeds", *(label for _, label in RATIOS[:4]), "params", "tokens/s"]
    return Table([h.removesuffix(" ×") for h in headers], body)


def retention_table(rows: list[dict], variant: str, keeps: Sequence[int]) -> Table:
    body = []
    for method in METHODS:
        for keep in keeps:
            chosen = select(rows, variant=variant, method=method, keep=keep)
            if chosen:
                cells = [ratio_text([r["retention"][key] for r in chosen]) for key, _ in RATIOS]
                params = format_number(chosen[0]["compressed"]["params_total"])
                body.append([method, str(keep), *cells, params])
    return Table(["method", "E′", *(label for _, label in RATIOS), "params after"], body)


def paired_cell(pairs: list[tuple[float | None, float | None]]) -> Comparison | str:
    """log a − log b over the seed pairs with both ratios positive: the paired comparison
    (written out, Holm-adjusted, by ``judged_rows``), or "–" with fewer than 2 pairs."""
    logs = [(math.log(a), math.log(b)) for a, b in pairs if a and b and a > 0 and b > 0]
    if len(logs) < 2:
        return "–"
    return paired_comparison([a for a, _ in logs], [b for _, b in logs], LOG_RATIO_MARGIN)


def paired_table(rows: list[dict], keeps: Sequence[int]) -> Table:
    keys = RATIOS[:4]
    body = []
    for method in METHODS:
        for keep in keeps:
            by_variant = {
                variant: {
                    r["seed"]: r for r in select(rows, variant=variant, method=method, keep=keep)
                }
                for variant in VARIANTS
            }
            seeds = sorted(by_variant["aligned"].keys() & by_variant["unaligned"].keys())
            if not seeds:
                continue
            cells = [
                paired_cell(
                    [
                        tuple(by_variant[v][s]["retention"][key] for v in ("aligned", "unaligned"))
                        for s in seeds
                    ]
                )
                for key, _ in keys
            ]
            body.append([method, str(keep), str(len(seeds)), *cells])
    headers = ["method", "E′", "pairs", *(f"Δ log({label})" for _, label in keys)]
    return Table(headers, judged_rows(body))


def method_pairs_table(rows: list[dict], variant: str, keep: int) -> Table | None:
    """Every pair of methods on the same base cells (``variant``, E′ = ``keep``): log retention
    of method A − method B paired by seed, one Holm family per table; None without a pair."""
    keys = RATIOS[:4]
    by_method = {
        method: {r["seed"]: r for r in select(rows, variant=variant, method=method, keep=keep)}
        for method in METHODS
    }
    body = []
    for index, first in enumerate(METHODS):
        for second in METHODS[index + 1 :]:
            seeds = sorted(by_method[first].keys() & by_method[second].keys())
            if len(seeds) < 2:
                continue
            cells = [
                paired_cell(
                    [
                        tuple(by_method[m][s]["retention"][key] for m in (first, second))
                        for s in seeds
                    ]
                )
                for key, _ in keys
            ]
            body.append([first, second, str(len(seeds)), *cells])
    if not body:
        return None
    headers = ["method A", "method B", "pairs", *(f"Δ log({label}) A − B" for _, label in keys)]
    return Table(headers, judged_rows(body))


def summary(rows: list[dict], keeps: Sequence[int]) -> str:
    parts = ["## Bases", "", to_markdown(base_table(rows)), ""]
    for variant in VARIANTS:
        parts += [f"## Retention, {variant} bases (compressed / original)", ""]
        parts += [to_markdown(retention_table(rows, variant, keeps)), ""]
    parts += ["## Aligned − unaligned retention, paired by seed", ""]
    parts += [outcome_legend({"every Δ log ratio": LOG_RATIO_MARGIN}, defaults=False), ""]
    parts += [to_markdown(paired_table(rows, keeps)), ""]
    for variant in VARIANTS:
        for keep in keeps:
            table = method_pairs_table(rows, variant, keep)
            if table is not None:
                parts += [f"## Method against method, {variant} bases, E′ = {keep}", ""]
                parts += [to_markdown(table), ""]
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path, help="the study's out_dir (runs/compression_study)")
    parser.add_argument("--keep", type=int, nargs="+", default=[6, 4], help="E' values")
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--summary-only", action="store_true", help="tabulate, compress nothing")
    parser.add_argument(
        "--task-examples",
        type=int,
        help="task-suite examples per task and set to evaluate (default: the run's own)",
    )
    parser.add_argument(
        "--cells", nargs="+", default=(), help="compress only these base cells (default: all)"
    )
    args = parser.parse_args()
    if not args.summary_only:
        compress_all(args.study, args.keep, args.calib_tokens, args.cells, args.task_examples)
    rows = load_reports(args.study)
    text = summary(rows, args.keep)
    (args.study / "compression_summary.md").write_text(text)
    (args.study / "compression_summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
