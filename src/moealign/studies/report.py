"""``moealign report`` and ``moealign compare``: ablation tables, plots, model cards.

From run and study directories (DESIGN.md §8; guide Steps 4–6 and 8) the report writes
``report.md``, ``report.html`` (images inlined as base64 PNG), ``figures/*.png`` and
``model_cards/<run>.md``:

* **Ablation table** — per variant and metric, mean ± 95% Student-t half width over the
  finished seeds, t_{0.975, n−1} · s/√n
  (:func:`moealign.evaluation.stats.mean_confidence_interval`), the half width to 2 significant
  digits and the mean to the same decimal place (:func:`moealign.tables.format_interval`).
  Where the metric has a direction (:func:`metric_direction`) the best mean is bold when its
  interval does not overlap the runner-up's, else italic (not shown to be best;
  :func:`best_marks`).
  Headers are human-readable names with units (:mod:`moealign.studies.labels`); the raw key
  is the HTML tooltip.
* **Against the baseline** — per variant, the paired difference variant − baseline (the
  study's per-variant ``baselines``, else its ``baseline``) over the seeds both finished, with
  its t interval, two-sided paired t-test p-value, Holm-adjusted p over the table's tests and
  the outcome: lower / higher, equivalent within ±m (TOST) or inconclusive
  (:mod:`moealign.evaluation.verdicts`; margins ``--margin METRIC=M`` over the defaults).
* **Efficiency** (guide Step 6) — tokens/s, training and wall time, peak memory, and the steps
  and training time to reach a target validation loss (default: the baseline's mean final
  validation loss).
* **Figures** — loss curves (the training loss EMA-smoothed over the raw curve), routing
  entropy, MaxVio and the projection alignment λ (MPI paper Eq. 11, at each evaluation) over
  training, the learning-rate and λ schedules (seed bands), expert-utilisation heatmaps
  (diverging colours centred at load / mean load = 1), per-task accuracy (seen vs held-out)
  and the CTGI of each variant against its baseline with a paired hierarchical bootstrap
  interval (seeds, then per-example answers) and its outcome, and the transfer ratio
  (DESIGN.md §7, upper bound 1; :mod:`moealign.studies.transfer`). A chart with nothing to
  show (no data, or every per-task accuracy 0) is a one-line note instead.
* **Model cards** and a **reproducibility appendix** per run.

A section whose data no run has is replaced by a one-line note.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from scipy import stats as scipy_stats

from moealign.evaluation.stats import mean_confidence_interval
from moealign.evaluation.verdicts import (
    Comparison,
    default_margin,
    format_p,
    holm,
    outcome_legend,
    paired_comparison,
)
from moealign.io import atomic_write_text
from moealign.progress import phase
from moealign.studies import plots
from moealign.studies.document import (
    Cell,
    Code,
    Details,
    Formula,
    Image,
    Note,
    Paragraph,
    Section,
    Table,
    to_html,
    to_markdown,
)
from moealign.studies.labels import metric_group, metric_label
from moealign.studies.results import (
    TASK_SPLITS,
    RunDataError,
    RunRecord,
    RunSet,
    load_run,
    load_runs,
    printable,
    run_results,
    time_to_target,
)
from moealign.studies.transfer import variant_transfer
from moealign.tables import Emphasis, format_interval, format_number, to_text
from moealign.training.preflight import check_writable_folder
from moealign.training.runs import MARKER_FILE, flatten_config, folder_kind, utc_now, write_marker

__all__ = [
    "DEFAULT_METRICS",
    "ReportFiles",
    "RunDataError",
    "best_marks",
    "build_report",
    "compare_text",
    "comparison",
    "metric_direction",
    "run_report",
    "transfer_table",
]

DEFAULT_METRICS = (
    "val_loss",
    "val_ppl",
    "val_routing/max_vio",
    "train_mean/routing/max_vio",
    "val_routing/projection_alignment",
    "change_from_step0/val_routing/projection_alignment",
    "val_routing/dead_experts",
    "val_routing/usage_entropy",
    "task_accuracy/seen/mean",
    "task_accuracy/heldout/mean",
    "tokens_per_s",
    "peak_memory_mib",
)
_LOWER_IS_BETTER = ("loss", "ppl", "max_vio", "dead_experts", "memory", "time", "steps_to")
_HIGHER_IS_BETTER = ("accuracy", "exact_match", "bleu", "rouge", "tokens_per_s", "ctgi")
_INTENDED_USE = (
    "Research artifact for studying Mixture-of-Experts routing (router variants, auxiliary "
    "losses, routing alignment) on moealign's built-in data. Not trained or evaluated for "
    "deployment, safety or factual use."
)


def metric_direction(metric: str) -> Literal["lower", "higher"] | None:
    """Whether a lower or a higher value of ``metric`` is better (None: neither, e.g. entropy
    of the router's per-token distribution). Usage entropy (balanced load) is higher-better."""
    name = metric.lower()
    if name.endswith("usage_entropy") or any(part in name for part in _HIGHER_IS_BETTER):
        return "higher"
    if any(part in name for part in _LOWER_IS_BETTER):
        return "lower"
    return None


def _with_arrow(name: str, metric: str) -> str:
    """``name ↓`` (lower ``metric`` is better), ``name ↑`` (higher is better) or the bare name."""
    return name + {"lower": " ↓", "higher": " ↑"}.get(metric_direction(metric) or "", "")


def _header(metric: str, prefix: str = "") -> Cell:
    """A metric's column header: its human-readable label and direction, the key as tooltip."""
    return Cell(_with_arrow(prefix + metric_label(metric), metric), title=metric)


# ---------------------------------------------------------------------- statistics


def _values_by_seed(runs: Sequence[RunRecord], metric: str) -> dict[int, float]:
    values = {}
    for run in runs:
        value = run_results(run).get(metric)
        if value is not None and math.isfinite(value):
            values[run.seed] = value
    return values


def _status_counts(run_set: RunSet, variant: str) -> str:
    runs = run_set.of_variant(variant, status=None)
    finished = sum(r.status == "finished" for r in runs)
    others = {}
    for run in runs:
        if run.status != "finished":
            others[run.status] = others.get(run.status, 0) + 1
    extra = ", ".join(f"{count} {status}" for status, count in sorted(others.items()))
    return f"{finished}/{len(runs)}" + (f" ({extra})" if extra else "")


def best_marks(
    intervals: Sequence[tuple[float, float]], direction: Literal["lower", "higher"] | None
) -> dict[int, Emphasis]:
    """The rows to mark in a column of (mean, 95% half width), keyed by row index.

    ``strong``: the best mean, where its interval does not overlap the runner-up's
    (|m₁ − m₂| > h₁ + h₂); ``em``: the best mean otherwise (the intervals overlap, a variant has
    one seed and no interval, or two share the best mean) — not shown to be best. Nothing is
    marked without a direction or with fewer than two distinct finite means.
    """
    finite = [
        (mean, half, row) for row, (mean, half) in enumerate(intervals) if math.isfinite(mean)
    ]
    if direction is None or len({mean for mean, _, _ in finite}) < 2:
        return {}
    ranked = sorted(finite, key=lambda entry: entry[0] if direction == "lower" else -entry[0])
    best = [row for mean, _, row in ranked if mean == ranked[0][0]]
    if len(best) > 1:
        return dict.fromkeys(best, "em")
    (mean_1, half_1, row), (mean_2, half_2, _) = ranked[:2]
    separated = math.isfinite(half_1 + half_2) and abs(mean_1 - mean_2) > half_1 + half_2
    return {row: "strong" if separated else "em"}


_MARKS_LEGEND = (
    "Bold: the best mean, and its 95% interval does not overlap the runner-up's. Italic: the "
    "best mean, but not shown to be best (the intervals overlap, or a variant has one seed). "
    "“± 0”: every seed gave the same value."
)


def ablation_table(run_set: RunSet, metrics: Sequence[str]) -> Table:
    """Rows: variants; columns: mean ± 95% t half width per metric over finished seeds, the
    best per column marked (:func:`best_marks`)."""
    columns = []
    for metric in metrics:
        column = []
        for variant in run_set.variants:
            values = list(_values_by_seed(run_set.of_variant(variant), metric).values())
            column.append(mean_confidence_interval(values)[:2] if values else (math.nan, math.nan))
        columns.append(column)
    rows = [[variant, _status_counts(run_set, variant)] for variant in run_set.variants]
    for metric, column in zip(metrics, columns, strict=True):
        marks = best_marks(column, metric_direction(metric))
        for row, (mean, half_width) in enumerate(column):
            rows[row].append(Cell(format_interval(mean, half_width), marks.get(row, "")))
    return Table(["variant", "seeds finished"] + [_header(m) for m in metrics], rows)


def baseline_table(
    run_set: RunSet,
    baseline: str,
    metrics: Sequence[str],
    margins: dict[str, float] | None = None,
) -> Table:
    """Per variant and metric: paired difference to the variant's baseline (the study's
    per-variant baseline, else ``baseline``) over shared seeds, "Δ ± half width (p, Holm p,
    n): outcome" (:mod:`moealign.evaluation.verdicts`; the table's tests are one Holm family;
    equivalence margins from ``margins``, else the metric's default); with one shared seed
    only Δ and "inconclusive (one seed)"; with none "–"."""
    rows, tests = [], []
    for variant in run_set.variants:
        base = run_set.baseline_of(variant, baseline)
        if variant == base:
            continue
        base_runs = run_set.of_variant(base)
        row: list = [variant, base]
        for metric in metrics:
            ours = _values_by_seed(run_set.of_variant(variant), metric)
            theirs = _values_by_seed(base_runs, metric)
            seeds = sorted(ours.keys() & theirs.keys())
            if not seeds:
                row.append("–")
            elif len(seeds) == 1:
                delta = ours[seeds[0]] - theirs[seeds[0]]
                row.append(f"{format_number(delta, signed=True)} (n=1): inconclusive (one seed)")
            else:
                row.append(None)  # filled below, once the family is known
                comparison = paired_comparison(
                    [ours[s] for s in seeds],
                    [theirs[s] for s in seeds],
                    default_margin(metric, margins),
                )
                tests.append((len(rows), len(row) - 1, metric, comparison))
        rows.append(row)
    adjusted = holm([comparison for *_, comparison in tests])
    for (row, column, metric, _), comparison in zip(tests, adjusted, strict=True):
        rows[row][column] = comparison.text(metric_direction(metric))
    return Table(["variant", "baseline"] + [_header(m, "Δ ") for m in metrics], rows)


# ---------------------------------------------------------------------- sections


def _runs_section(run_set: RunSet) -> Section:
    rows = []
    for run in run_set.runs:
        status = run.status
        if run.status == "diverged":
            status = f"diverged at step {run.diverged_step}"
        rows.append([run.name, run.variant, str(run.seed), status, run.error, str(run.path)])
    return Section(
        "Runs", [Table(["run", "variant", "seed", "status", "error", "directory"], rows)]
    )


_INTERVAL_MATHML = (
    "<mrow><mover><mi>x</mi><mo>‾</mo></mover><mo>±</mo><msub><mi>t</mi><mrow><mn>0.975</mn>"
    "<mo>,</mo><mi>n</mi><mo>−</mo><mn>1</mn></mrow></msub><mo>·</mo><mfrac><mi>s</mi>"
    "<msqrt><mi>n</mi></msqrt></mfrac></mrow>"
)
_INTERVAL_LATEX = r"\bar{x} \pm t_{0.975,\,n-1} \cdot \frac{s}{\sqrt{n}}"


def _interval_factor(n: int) -> float:
    """t_{0.975, n−1}/√n: the 95% half width of a mean of n values in units of their s."""
    return float(scipy_stats.t.ppf(0.975, n - 1) / math.sqrt(n))


def _few_seeds_note(seed_counts: set[int]) -> Note | None:
    """A note when some interval rests on n = 2 values: t_{0.975,1} = 12.7 makes it about
    ±9 s wide, so it cannot tell most differences apart (none for n ≥ 3 or n = 1)."""
    if 2 not in seed_counts:
        return None
    return Note(
        f"Some cells rest on n = 2 seeds: their 95% interval is ±{_interval_factor(2):.1f} s "
        f"(t = {scipy_stats.t.ppf(0.975, 1):.1f} with 1 degree of freedom), often wider than "
        "the value itself, so it says little; 3 seeds give "
        f"±{_interval_factor(3):.1f} s, 5 seeds ±{_interval_factor(5):.1f} s."
    )


def _ablation_sections(
    run_set: RunSet,
    baseline: str | None,
    metrics: Sequence[str],
    margins: dict[str, float] | None = None,
) -> list[Section]:
    present = {k for run in run_set.runs for k in run_results(run)}
    shown = [m for m in metrics if m in present]
    missing = [m for m in metrics if m not in present]
    table = Section("Ablation table")
    groups = _metric_groups(shown)
    if shown:
        table.blocks += [
            Paragraph(
                "Each cell is the mean over the seeds that finished, ± the half width of its 95% "
                "confidence interval: Student's t quantile for n − 1 degrees of freedom times "
                "the standard deviation s over the n seeds, divided by √n:"
            ),
            Formula(_INTERVAL_MATHML, _INTERVAL_LATEX),
            Paragraph(
                "The half width is shown to 2 significant digits and the mean to the same "
                "decimal place; one seed shows the value alone. ↓/↑: lower/higher is better. "
                + _MARKS_LEGEND
                + " Columns are grouped by kind; in the HTML report each header's tooltip is "
                "its metric key (for --metrics)."
            ),
        ]
        counts = {
            len(_values_by_seed(run_set.of_variant(variant), metric))
            for variant in run_set.variants
            for metric in shown
        }
        table.blocks += filter(None, [_few_seeds_note(counts)])
    else:
        table.blocks.append(Note("No run has any of the requested metrics."))
    if missing:
        table.blocks.append(Note(f"Not found in any run: {', '.join(missing)}."))
    sections = [table, *_grouped_tables(table, groups, lambda m: ablation_table(run_set, m))]
    against = Section("Against the baseline")
    sections.append(against)
    if baseline is None:
        against.blocks.append(Note("No baseline named (study baseline or --baseline)."))
    elif shown and len(run_set.variants) > 1:
        against.blocks.append(
            Paragraph(
                "Paired differences variant − its baseline (the study's per-variant baseline, "
                f"else {baseline}) over the seeds both finished: the mean difference ± its 95% "
                "t half width (the formula above, over the per-seed differences), the "
                "two-sided paired t-test p-value and, where a table holds several tests, its "
                "Holm-adjusted value over that table's tests. " + outcome_legend(margins)
            )
        )
        shared = {
            len(
                _values_by_seed(run_set.of_variant(variant), metric).keys()
                & _values_by_seed(run_set.of_variant(base), metric).keys()
            )
            for variant in run_set.variants
            if (base := run_set.baseline_of(variant, baseline)) not in (None, variant)
            for metric in shown
        }
        against.blocks += filter(None, [_few_seeds_note(shared)])
        sections += _grouped_tables(
            against, groups, lambda m: baseline_table(run_set, baseline, m, margins)
        )
    else:
        against.blocks.append(Note("Only one variant (or no metric): nothing to compare."))
    return sections


_GROUP_COLUMNS = 5  # metric columns per table, so that a table fits the page


def _metric_groups(metrics: Sequence[str]) -> list[tuple[str, list[list[str]]]]:
    """``metrics`` by kind (:func:`moealign.studies.labels.metric_group`, in order of first
    appearance), each kind's metrics in tables of at most :data:`_GROUP_COLUMNS` columns."""
    by_group: dict[str, list[str]] = {}
    for metric in metrics:
        by_group.setdefault(metric_group(metric), []).append(metric)
    return [
        (
            group,
            [
                members[start : start + _GROUP_COLUMNS]
                for start in range(0, len(members), _GROUP_COLUMNS)
            ],
        )
        for group, members in by_group.items()
    ]


def _grouped_tables(
    parent: Section,
    groups: list[tuple[str, list[list[str]]]],
    table: Callable[[list[str]], Table],
) -> list[Section]:
    """The tables of each metric group: in ``parent`` itself for a single group, else in one
    subsection per group titled "<parent>: <group>" (returned)."""
    if len(groups) == 1:
        parent.blocks += [table(chunk) for chunk in groups[0][1]]
        return []
    return [
        Section(f"{parent.title}: {group}", [table(chunk) for chunk in chunks], 3)
        for group, chunks in groups
    ]


def _target_loss(run_set: RunSet, baseline: str | None, target_loss: float | None) -> float | None:
    if target_loss is not None:
        return target_loss
    if baseline is None:
        return None
    values = list(_values_by_seed(run_set.of_variant(baseline), "val_loss").values())
    return sum(values) / len(values) if values else None


_EFFICIENCY_METRICS = ("tokens_per_s", "train_time_s", "wall_time_s", "peak_memory_mib")


def _efficiency_section(run_set: RunSet, target: float | None) -> Section:
    section = Section("Efficiency")
    rows = []
    for run in run_set.runs:
        results = run_results(run)
        if not results:
            continue
        reached = time_to_target(run, target) if target is not None else None
        rows.append(
            [
                run.name,
                *(format_number(results.get(key)) for key in _EFFICIENCY_METRICS),
                str(reached[0]) if reached else "not reached",
                format_number(reached[1]) if reached else "–",
            ]
        )
    if not rows:
        section.blocks.append(Note("No run logged training or evaluation metrics."))
        return section
    if target is None:
        section.blocks.append(Note("No target validation loss (give --target-loss or a baseline)."))
    else:
        section.blocks.append(
            Paragraph(
                f"Target validation loss {target:.4g}. Training time sums the logged windows "
                "(tokens / tokens per second); wall time spans meta.json's start and end."
            )
        )
    headers = [Cell(metric_label(key), title=key) for key in _EFFICIENCY_METRICS]
    section.blocks.append(Table(["run", *headers, "steps to target", "time to target (s)"], rows))
    return section


def _task_accuracy(run_set: RunSet) -> dict[str, dict[str, dict[str, tuple[float, float]]]]:
    """accuracy[split][variant][task] = (mean, t half width) over finished seeds."""
    table: dict[str, dict[str, dict[str, tuple[float, float]]]] = {s: {} for s in TASK_SPLITS}
    for variant in run_set.variants:
        runs = run_set.of_variant(variant)
        for split in TASK_SPLITS:
            tasks = {
                key.split("/")[2]
                for run in runs
                for key in run_results(run)
                if key.startswith(f"task_accuracy/{split}/") and not key.endswith("/mean")
            }
            per_task = {}
            for task in sorted(tasks):
                values = list(_values_by_seed(runs, f"task_accuracy/{split}/{task}").values())
                per_task[task] = mean_confidence_interval(values)[:2]
            if per_task:
                table[split][variant] = per_task
    return table


def transfer_table(run_set: RunSet, baseline: str) -> Table | Note:
    """Per variant, against its baseline (the study's per-variant baseline, else ``baseline``):
    mean held-out and in-domain accuracy gains (the held-out one with its paired bootstrap 95%
    interval), CTGI with its paired bootstrap 95% interval (hierarchical: seeds, then examples)
    and a warning when tasks with headroom under 10 points carry over half its weight, and the
    transfer ratio (:func:`moealign.studies.transfer.variant_transfer`). The held-out gain and
    CTGI each carry their outcome against 0 (bootstrap p, Holm-adjusted over the table's tests;
    margin 1 point and 0.01)."""
    rows: list[list[str]] = []
    tests: list[tuple[int, int, Comparison]] = []  # (row, column, comparison)
    warnings: dict[int, str] = {}
    for variant in run_set.variants:
        base = run_set.baseline_of(variant, baseline)
        if base is None or base == variant:
            continue
        try:
            found = variant_transfer(run_set, variant, base)
        except ValueError as err:
            rows.append([variant, base, "–", "–", "–", "–", "–", str(err)])
            continue
        if found is None:
            continue
        estimate = found.ctgi
        heldout_text = f"{found.heldout_gain:+.3f}"
        ctgi_text = "–"
        if estimate is not None:
            heldout_text += f" [{estimate.gain_ci_low:+.3f}, {estimate.gain_ci_high:+.3f}]"
            ctgi_text = f"{estimate.value:+.3f} [{estimate.ci_low:+.3f}, {estimate.ci_high:+.3f}]"
            tests += [(len(rows), 3, estimate.gain_comparison), (len(rows), 5, estimate.comparison)]
        excluded = (
            ", ".join(sorted(estimate.excluded_tasks)) or "none"
            if estimate is not None
            else found.note
        )
        rows.append(
            [
                variant,
                base,
                ",".join(map(str, found.seeds)),
                heldout_text,
                f"{found.indomain_gain:+.3f}",
                ctgi_text,
                format_number(found.transfer_ratio),
                excluded,
            ]
        )
        if estimate is not None and estimate.warning:
            warnings[len(rows) - 1] = f" (warning: {estimate.warning})"
    for (row, column, _), comparison in zip(tests, holm([c for *_, c in tests]), strict=True):
        p_text = format_p(comparison.p_value)
        if comparison.family > 1:
            p_text += f", Holm {format_p(comparison.p_adjusted)}"
        rows[row][column] += f": {comparison.describe('higher')} ({p_text})"
    for row, warning in warnings.items():
        rows[row][5] += warning
    if not rows:
        return Note(
            "No variant shares a seed with per-example held-out answers with its baseline: no CTGI."
        )
    return Table(
        [
            "variant",
            "baseline",
            "seeds",
            "Δ held-out acc [95% CI]",
            "Δ in-domain acc",
            "CTGI [95% CI]",
            "transfer ratio",
            "excluded (headroom < 1 pt)",
        ],
        rows,
    )


def _figure_sections(run_set: RunSet, baseline: str | None, figures: Path) -> list[Section]:
    # Every variant keeps its place (and colour) in every figure, finished runs or not.
    variants = {v: run_set.of_variant(v) for v in run_set.variants}
    sections = []
    curve_figures = [
        ("Loss curves", "loss_curves.png", [("loss", "train"), ("val_loss", "val")]),
        (
            "Routing over training",
            "routing.png",
            [
                ("routing/token_entropy", "train"),
                ("routing/usage_entropy", "train"),
                ("routing/max_vio", "train"),
                ("val_routing/projection_alignment", "val"),
            ],
        ),
        ("Schedules", "schedules.png", [("lr", "train"), ("lambda", "train")]),
    ]
    for title, filename, panels in curve_figures:
        path = plots.plot_curves(variants, panels, figures / filename, title)
        caption = f"{title}: mean over finished seeds, band = min–max over seeds"
        if any(key in plots.SMOOTHED for key, split in panels if split == "train"):
            caption += (
                "; the training loss is an exponential moving average (span: a tenth of the "
                "logged points, at least 2) over its raw mean, drawn faint"
            )
        block = (
            Image(path, caption)
            if path
            else Note(f"No finished run logged {', '.join(key for key, _ in panels)}.")
        )
        sections.append(Section(title, [block]))
    path = plots.plot_expert_utilisation(variants, figures / "expert_utilisation.png")
    sections.append(
        Section(
            "Expert utilisation",
            [
                Image(path, "Expert load / mean load per layer at the final evaluation")
                if path
                else Note("No final evaluation recorded expert_counts.")
            ],
        )
    )
    accuracy = _task_accuracy(run_set)
    zero = [
        split
        for split, by_variant in accuracy.items()
        if by_variant and all(m == 0 for t in by_variant.values() for m, _ in t.values())
    ]
    colors = plots.variant_colors(run_set.variants)
    shown = {split: {} if split in zero else by_variant for split, by_variant in accuracy.items()}
    path = plots.plot_task_accuracy(shown, figures / "task_accuracy.png", colors)
    task_section = Section("Per-task accuracy")
    if not any(accuracy.values()):
        task_section.blocks.append(Note("No final evaluation has task accuracies."))
    else:
        if zero:
            names = " and ".join("held-out-task" if s == "heldout" else "seen-task" for s in zero)
            task_section.blocks.append(
                Note(f"Every {names} accuracy is 0, for every variant: nothing to chart.")
            )
        if path is not None:
            task_section.blocks.append(
                Image(path, "Accuracy per task, seen vs held-out (error bars: 95% t interval)")
            )
        if baseline is not None:
            task_section.blocks += [
                Paragraph(
                    "CTGI (DESIGN.md §7) against each variant's baseline, upper bound 1: mean "
                    "over held-out tasks of (A_m − A_b)/(1 − A_b), tasks with headroom under 1 "
                    "point excluded; 95% paired percentile bootstrap, hierarchical: each replicate "
                    "draws the seeds, then the examples (once for all seeds where they answered "
                    "the same examples, else per seed), so seed-to-seed variance counts; beside "
                    "the plain held-out "
                    "accuracy gain and its interval from the same resamples; a task's weight in "
                    "CTGI is ∝ 1/headroom, so a warning marks CTGI values where tasks with under "
                    "10 points of headroom carry over half of it. Transfer ratio: mean held-out "
                    "gain / mean in-domain (seen-task test) gain."
                ),
                transfer_table(run_set, baseline),
            ]
    sections.append(task_section)
    return sections


# ---------------------------------------------------------------------- model cards


def _command_text(meta: dict[str, Any]) -> str:
    argv = list(meta.get("command", []))
    if argv and Path(argv[0]).name in ("cli.py", "moealign", "__main__.py"):
        argv = ["moealign", *argv[1:]]
    return shlex.join(argv) if argv else "(not recorded)"


def _architecture(model: dict[str, Any]) -> str:
    if not model:
        return "(not recorded)"
    text = (
        f"decoder-only transformer: {model.get('n_layers')} layers, d_model {model.get('d_model')}"
        f", {model.get('n_heads')} heads, vocabulary {model.get('vocab_size')}"
    )
    if model.get("ffn") == "moe":
        text += (
            f"; MoE FFN every {model.get('moe_every', 1)} layer(s): {model.get('n_experts')} "
            f"experts of width {model.get('expert_d_ff')}, top-{model.get('top_k')}, router "
            f"{model.get('router')} {json.dumps(model.get('router_options') or {})}"
        )
        if model.get("shared_d_ff"):
            text += f", shared expert width {model['shared_d_ff']}"
    else:
        text += f"; dense FFN width {model.get('d_ff')}"
    return text


def _data_description(data: dict[str, Any]) -> str:
    if not data:
        return "(not recorded)"
    source = data.get("source")
    parts = [f"source {source}, {data.get('tokenizer')} tokenizer"]
    if source in ("tasks", "mixed"):
        tasks = ", ".join(data.get("tasks") or []) or "all"
        heldout = data.get("heldout_tasks")
        parts.append(
            f"synthetic tasks ({tasks}), {data.get('examples_per_task')} examples per task, "
            "train/val/test 70/15/15 per task (DESIGN.md §7)"
            + (f", held-out tasks {', '.join(heldout)}" if heldout else "")
        )
    if source in ("text", "mixed"):
        parts.append(f"Python standard library text, at most {data.get('text_max_bytes')} bytes")
    if source == "files":
        parts.append("files " + ", ".join(data.get("paths") or []))
    return "; ".join(parts)


def _failure_modes(run: RunRecord) -> list[str]:
    found = []
    if run.status == "diverged":
        found.append(f"diverged: non-finite loss first logged at step {run.diverged_step}")
    elif run.status != "finished":
        found.append(f"run {run.status}" + (f": {run.error}" if run.error else ""))
    for record in run.metrics:
        if "event" in record:
            details = {k: v for k, v in record.items() if k not in ("event", "step")}
            found.append(f"event at step {record.get('step')}: {record['event']} {details or ''}")
    dead_steps = [
        r["step"] for r in run.records("train") if (r.get("routing/dead_experts") or 0) > 0
    ]
    if dead_steps:
        found.append(
            f"dead experts (no token in a batch) at {len(dead_steps)} logged training steps, "
            f"first at step {dead_steps[0]}"
        )
    counts = run.final_eval.get("expert_counts")
    if counts:
        dead = [(layer, e) for layer, row in enumerate(counts) for e, c in enumerate(row) if c == 0]
        if dead:
            found.append(
                "dead experts at the final evaluation (layer, expert): "
                + ", ".join(f"({layer}, {e})" for layer, e in dead)
            )
    return found or ["none observed in the logged metrics"]


def model_card(run: RunRecord) -> Section:
    """The model card of one run, its reproducibility appendix and its resolved config, each
    folded under a one-line summary (``<details>``)."""
    config, meta, results = run.config, run.meta, run_results(run)
    train, optim = config.get("train", {}), config.get("optim", {})
    params = (
        f"{int(results['params_total']):,} total / {int(results['params_active']):,} active"
        if "params_total" in results and "params_active" in results
        else "(no final evaluation)"
    )
    tokens = results.get("tokens_seen")
    budget = (
        f"{train.get('steps')} steps × {train.get('batch_size')} sequences × "
        f"{train.get('seq_len')} tokens"
        + (f" = {int(tokens):,} tokens seen" if tokens is not None else "")
        + f"; optimizer {optim.get('name')} lr {optim.get('lr')} ({optim.get('schedule')})"
    )
    measured = [
        f"{name} {format_number(results[key])}"
        for key, name in (
            ("val_loss", "validation loss"),
            ("val_ppl", "perplexity"),
            ("val_routing/max_vio", "MaxVio"),
            ("val_routing/dead_experts", "dead experts/layer"),
            ("task_accuracy/seen/mean", "seen-task accuracy"),
            ("task_accuracy/heldout/mean", "held-out-task accuracy"),
        )
        if key in results
    ]
    card = Table(
        ["field", "value"],
        [
            ["run", f"{run.name} (variant {run.variant}, seed {run.seed})"],
            ["architecture", _architecture(config.get("model", {}))],
            ["parameters", params],
            ["data and splits", _data_description(config.get("data", {}))],
            ["training budget", budget],
            ["intended use", _INTENDED_USE],
            ["measured results", "; ".join(measured) or "(none)"],
            ["known failure modes", "; ".join(_failure_modes(run))],
        ],
    )
    versions = meta.get("versions", {})
    commands = [_command_text(meta)] + [
        _command_text(r) + f"   # resumed {r.get('time')}" for r in meta.get("resumed", [])
    ]
    reproducibility = [
        Paragraph("Command (run from the directory the run was started in):"),
        Code("\n".join(commands), "bash"),
        Table(
            ["item", "value"],
            [
                ["git commit", str(meta.get("git_commit", "(not recorded)"))],
                ["python", str(meta.get("python", "(not recorded)"))],
                ["packages", ", ".join(f"{k} {v}" for k, v in versions.items()) or "–"],
                [
                    "hardware",
                    f"device {meta.get('device', '?')} on host {meta.get('hostname', '?')}",
                ],
                [
                    "wall time",
                    f"{meta.get('start_time', '?')} → {meta.get('end_time', '?')} "
                    f"({format_number(results.get('wall_time_s', math.nan))} s)",
                ],
            ],
        ),
    ]
    return Section(
        f"Model card: {run.name}",
        [
            Details(
                "Card: architecture, parameters, data, training budget, intended use, measured "
                "results, known failure modes",
                [card],
            ),
            Details("Reproducibility: command, versions, hardware, wall time", reproducibility),
            Details("Resolved config (config.json)", [Code(json.dumps(config, indent=2), "json")]),
        ],
        level=3,
    )


# ---------------------------------------------------------------------- the report


@dataclass
class ReportFiles:
    markdown: Path
    html: Path
    figures: list[Path]
    model_cards: list[Path]


def _unique_names(runs: Sequence[RunRecord]) -> list[str]:
    names, seen = [], {}
    for run in runs:
        count = seen.get(run.name, 0)
        seen[run.name] = count + 1
        names.append(run.name if count == 0 else f"{run.name}-{count}")
    return names


_REPORT_ENTRIES = {"report.md", "report.html", "figures", "model_cards", MARKER_FILE}


def _check_report_folder(out_dir: Path) -> None:
    """``--out`` may be new, empty, or a report folder (its marker, or only the entries a report
    writes, for one written before the marker): a report never overwrites others' files."""
    check_writable_folder(out_dir, "--out", writes="report")
    if not out_dir.is_dir() or folder_kind(out_dir) == "report":
        return
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in _REPORT_ENTRIES)
    if foreign:
        raise RunDataError(
            f"--out: got {str(out_dir)!r}, which holds files a report did not write "
            f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); choose a new or "
            "empty folder"
        )


def build_report(
    paths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    baseline: str | None = None,
    metrics: Sequence[str] | None = None,
    target_loss: float | None = None,
    title: str = "moealign report",
    margins: dict[str, float] | None = None,
) -> ReportFiles:
    """Write the report of the runs/studies in ``paths`` to ``out_dir`` (see module doc).

    ``baseline`` (default: the study's) names a variant; ``metrics`` default to
    :data:`DEFAULT_METRICS`; ``target_loss`` defaults to the baseline's final validation loss;
    ``margins`` are equivalence margins by metric over the defaults
    (:func:`moealign.evaluation.verdicts.default_margin`).
    """
    if target_loss is not None and not (math.isfinite(target_loss) and target_loss > 0):
        raise RunDataError(f"--target-loss: got {target_loss}; expected a finite number > 0")
    out_dir = Path(out_dir)
    _check_report_folder(out_dir)
    run_set = load_runs(paths)
    baseline = baseline or run_set.baseline
    if baseline is not None and baseline not in run_set.variants:
        raise RunDataError(f"--baseline: got {baseline!r}; expected one of {run_set.variants}")
    figures_dir, cards_dir = out_dir / "figures", out_dir / "model_cards"
    cards_dir.mkdir(parents=True, exist_ok=True)
    write_marker(out_dir, "report")

    summary = Section(
        "Summary",
        [
            Paragraph(
                f"{len(run_set.runs)} runs in {len(run_set.variants)} variants "
                f"({', '.join(run_set.variants)}); baseline: {baseline or 'none'}; "
                f"generated {utc_now()} from {', '.join(str(p) for p in paths)}."
            )
        ],
    )
    target = _target_loss(run_set, baseline, target_loss)
    sections = [
        summary,
        _runs_section(run_set),
        *_ablation_sections(run_set, baseline, metrics or DEFAULT_METRICS, margins),
        _efficiency_section(run_set, target),
        *_figure_sections(run_set, baseline, figures_dir),
    ]
    card_sections: list[Section] = []
    card_paths = []
    for run, name in zip(run_set.runs, _unique_names(run_set.runs), strict=True):
        if not run.config:
            continue
        card = model_card(run)
        card_sections.append(card)
        card_path = cards_dir / f"{name}.md"
        atomic_write_text(
            card_path, printable(to_markdown(f"Model card: {run.name}", [card], cards_dir))
        )
        card_paths.append(card_path)
    sections.append(
        Section(
            "Model cards and reproducibility",
            [] if card_sections else [Note("No run recorded a config.")],
        )
    )
    sections += card_sections

    markdown_path, html_path = out_dir / "report.md", out_dir / "report.html"
    atomic_write_text(markdown_path, printable(to_markdown(title, sections, out_dir)))
    atomic_write_text(html_path, printable(to_html(title, sections)))
    figures = sorted(figures_dir.glob("*.png")) if figures_dir.exists() else []
    return ReportFiles(markdown_path, html_path, figures, card_paths)


# ---------------------------------------------------------------------- compare


def comparison(path_a: str | Path, path_b: str | Path) -> dict[str, Any]:
    """Two runs side by side, as data: ``a``/``b`` (path, status), ``config_differences``
    (flattened config key -> {a, b}; a key one run lacks is None there) and ``metrics``
    (every final non per-layer result -> {a, b, difference = b − a}; None where a run lacks
    it or a value is not finite). One run each cannot judge a difference: it is inconclusive
    (:mod:`moealign.evaluation.verdicts` needs repeated seeds)."""
    a, b = load_run(path_a), load_run(path_b)
    for run, path in ((a, path_a), (b, path_b)):
        if not run.config:
            raise RunDataError(f"{path}: expected a run directory (with config.json)")
    flat_a, flat_b = flatten_config(a.config), flatten_config(b.config)
    differing = sorted(k for k in flat_a.keys() | flat_b.keys() if flat_a.get(k) != flat_b.get(k))
    results_a, results_b = run_results(a), run_results(b)
    keys = sorted(k for k in results_a.keys() | results_b.keys() if "/layer" not in k)

    def finite(value: float) -> float | None:
        return value if math.isfinite(value) else None

    metrics = {}
    for key in keys:
        va, vb = results_a.get(key, math.nan), results_b.get(key, math.nan)
        metrics[key] = {"a": finite(va), "b": finite(vb), "difference": finite(vb - va)}
    return {
        "a": {"path": str(a.path), "status": a.status},
        "b": {"path": str(b.path), "status": b.status},
        "config_differences": {k: {"a": flat_a.get(k), "b": flat_b.get(k)} for k in differing},
        "metrics": metrics,
    }


def compare_text(result: dict[str, Any]) -> str:
    """:func:`comparison` for the terminal: config keys that differ, then every final result
    with the difference B − A."""
    a, b = result["a"], result["b"]
    lines = [f"A: {a['path']} ({a['status']})", f"B: {b['path']} ({b['status']})", ""]
    lines.append("config differences")
    if result["config_differences"]:
        rows = [
            [k, json.dumps(values["a"]), json.dumps(values["b"])]
            for k, values in result["config_differences"].items()
        ]
        lines.append(to_text(Table(["key", "A", "B"], rows, align="lll")))
    else:
        lines.append("(none)")
    lines += ["", "final metrics"]
    rows = [
        [
            _with_arrow(key, key),
            format_number(m["a"]),
            format_number(m["b"]),
            format_number(m["difference"], signed=True),
        ]
        for key, m in result["metrics"].items()
    ]
    lines.append(to_text(Table(["metric", "A", "B", "B − A"], rows)) if rows else "(none)")
    if rows:
        lines += [
            "",
            "B − A is one draw of each run: without repeated seeds there is no interval, so every "
            "difference is inconclusive (neither lower, higher nor equivalent is shown); compare "
            "several seeds of each with `moealign report` for verdicts.",
        ]
    return "\n".join(lines)


# ---------------------------------------------------------------------- command line


def run_report(args: argparse.Namespace) -> ReportFiles:
    """``moealign report``: write the report; print (and return) where."""
    out = args.out or (str(Path(args.paths[0]) / "report") if len(args.paths) == 1 else "report")
    with phase(f"report: {len(args.paths)} inputs to tables, figures and model cards"):
        files = build_report(
            args.paths,
            out,
            baseline=args.baseline,
            metrics=args.metrics,
            target_loss=args.target_loss,
            title=args.title,
            margins=dict(args.margins or []),
        )
    print(f"wrote {files.markdown}, {files.html}")
    print(f"  {len(files.figures)} figures, {len(files.model_cards)} model cards")
    return files
