"""Report figures (matplotlib, Agg, PNG): training curves with seed bands, expert-utilisation
heatmaps, routing statistics over training, schedules, per-task accuracy bars.

Curves of a variant are drawn as the mean over its finished seeds at the steps every seed
logged, with a band from the minimum to the maximum over seeds; the training loss is drawn
EMA-smoothed (:func:`ema`) over its faint raw curve. Panels sit in a grid of at most
:data:`COLUMNS` columns, titled with the metrics' human-readable names
(:mod:`moealign.studies.labels`), with one legend per figure. Figures are at most
:data:`MAX_WIDTH_IN` inches wide at :data:`DPI`, so a report page shows them at full size.
Each function writes one PNG and returns its path, or None when no run has the data (the
report then says so). Figures are built with :class:`matplotlib.figure.Figure` (no pyplot
state, no GUI backend).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from moealign.evaluation import diagnostics
from moealign.studies.labels import metric_name, metric_unit
from moealign.studies.results import TASK_SPLITS, RunRecord

__all__ = [
    "COLUMNS",
    "DPI",
    "MAX_WIDTH_IN",
    "SMOOTHED",
    "ema",
    "plot_curves",
    "plot_expert_utilisation",
    "plot_task_accuracy",
    "seed_curve",
    "smoothing_span",
    "variant_colors",
]

VariantRuns = Mapping[str, Sequence[RunRecord]]
COLUMNS = 2
DPI = 110
MAX_WIDTH_IN = 10.5  # 1155 px at DPI: inside the report's 1200 px column
SMOOTHED = frozenset({"loss", "lm_loss"})  # training-split keys drawn EMA-smoothed


def variant_colors(variants: Sequence[str]) -> dict[str, str]:
    """One colour per variant (matplotlib's cycle C0…C9), the same in every figure."""
    return {variant: f"C{index % 10}" for index, variant in enumerate(variants)}


def seed_curve(
    runs: Sequence[RunRecord], key: str, split: str
) -> tuple[np.ndarray, np.ndarray] | None:
    """(steps, values (seeds, steps)) of ``key`` at the steps where every run logged it."""
    per_run = []
    for run in runs:
        values = {
            int(r["step"]): float(r[key])
            for r in run.records(split)
            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
        }
        if values:
            per_run.append(values)
    if not per_run:
        return None
    steps = sorted(set.intersection(*(set(v) for v in per_run)))
    if not steps:
        return None
    return np.asarray(steps), np.asarray([[v[s] for s in steps] for v in per_run])


def smoothing_span(n_points: int) -> float:
    """The EMA span for a curve of ``n_points`` logged values: a tenth of them, at least 2."""
    return max(2.0, n_points / 10)


def ema(values: np.ndarray, span: float) -> np.ndarray:
    """Bias-corrected exponential moving average along the last axis, α = 2 / (span + 1):

    s_t = Σ_{i≤t} (1 − α)^{t−i} x_i / Σ_{i≤t} (1 − α)^{t−i}

    (pandas' ``ewm(span=span, adjust=True).mean()``; the first value is kept as is, so the
    curve does not start at zero).
    """
    if span < 1:
        raise ValueError(f"span: got {span}; expected a number >= 1")
    decay = 1.0 - 2.0 / (span + 1.0)
    values = np.asarray(values, dtype=np.float64)
    smoothed = np.empty_like(values)
    numerator, denominator = np.zeros(values.shape[:-1]), 0.0
    for t in range(values.shape[-1]):
        numerator = decay * numerator + values[..., t]
        denominator = decay * denominator + 1.0
        smoothed[..., t] = numerator / denominator
    return smoothed


def _band(
    ax: Axes, label: str, runs: Sequence[RunRecord], key: str, split: str, smooth: bool, color: str
) -> bool:
    curve = seed_curve(runs, key, split)
    if curve is None:
        return False
    steps, values_SN = curve
    if smooth and len(steps) > 2:
        ax.plot(steps, values_SN.mean(0), color=color, alpha=0.3, linewidth=0.8)
        values_SN = ema(values_SN, smoothing_span(len(steps)))
    marker = "o" if len(steps) <= 20 else None  # a few evaluations: points, not only segments
    ax.plot(
        steps, values_SN.mean(0), label=f"{label} (n={len(values_SN)})", color=color, marker=marker
    )
    if len(values_SN) > 1:
        ax.fill_between(steps, values_SN.min(0), values_SN.max(0), color=color, alpha=0.2)
    return True


def _figure_legend(figure: Figure, axes: Sequence[Axes]) -> None:
    """One legend for the whole figure, below the panels, from the first panel's lines."""
    for ax in axes:
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            figure.legend(
                handles, labels, loc="outside lower center", ncols=min(len(handles), 3), fontsize=9
            )
            return


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=DPI)
    return path


def _grid(n_panels: int, panel_height: float) -> tuple[Figure, list[Axes]]:
    """A constrained-layout figure with ``n_panels`` panels in rows of :data:`COLUMNS`; spare
    grid cells are removed."""
    columns = min(n_panels, COLUMNS)
    rows = math.ceil(n_panels / columns)
    figure = Figure(
        figsize=(MAX_WIDTH_IN * columns / COLUMNS, panel_height * rows + 0.8), layout="constrained"
    )
    axes = list(figure.subplots(rows, columns, squeeze=False).flat)
    for ax in axes[n_panels:]:
        ax.remove()
    return figure, axes[:n_panels]


def plot_curves(
    variants: VariantRuns,
    panels: Sequence[tuple[str, str]],
    path: Path,
    title: str,
    smoothed: Collection[str] = SMOOTHED,
) -> Path | None:
    """One panel per (metric key, split) with a seed band per variant, titled with the metric's
    name (its unit on the y axis); training-split keys in ``smoothed`` are drawn EMA-smoothed
    over the faint raw mean. Panels no run logged are dropped; None when every one is."""
    colors = variant_colors(list(variants))
    drawn = [
        (key, split)
        for key, split in panels
        if any(seed_curve(runs, key, split) for runs in variants.values())
    ]
    if not drawn:
        return None
    figure, axes = _grid(len(drawn), 3.3)
    for ax, (key, split) in zip(axes, drawn, strict=True):
        smooth = split == "train" and key in smoothed
        for variant, runs in variants.items():
            _band(ax, variant, runs, key, split, smooth, colors[variant])
        ax.set_xlabel("step")
        ax.set_ylabel(metric_unit(key))
        ax.set_title(metric_name(key) + (" (EMA-smoothed, raw faint)" if smooth else ""))
        ax.grid(alpha=0.3)
    _figure_legend(figure, axes)
    figure.suptitle(title, fontweight="bold")
    return _save(figure, path)


def plot_expert_utilisation(variants: VariantRuns, path: Path) -> Path | None:
    """Heatmap per variant of load_e / mean_e load_e (DESIGN.md §4 diagnostics; 1 = balanced)
    by layer and expert, from ``final_eval.json``'s ``expert_counts``, averaged over seeds.

    A diverging colour map centred at 1 (blue: under-loaded, red: over-loaded), from 0 (a
    dead expert) to at least 2, one colour bar for every panel; small maps show each value.
    """
    maps: dict[str, np.ndarray] = {}
    for variant, runs in variants.items():
        counts = [
            np.asarray(r.final_eval["expert_counts"])
            for r in runs
            if "expert_counts" in r.final_eval
        ]
        shapes = {c.shape for c in counts}
        if counts and len(shapes) == 1:
            utilisation = [
                diagnostics.expert_utilisation(torch.from_numpy(c)).numpy() for c in counts
            ]
            maps[variant] = np.mean(utilisation, axis=0)
    if not maps:
        return None
    layers = max(m.shape[0] for m in maps.values())
    figure, axes = _grid(len(maps), min(0.45 * layers + 1.6, 6.0))
    norm = TwoSlopeNorm(
        vmin=0.0, vcenter=1.0, vmax=max(2.0, *(float(m.max()) for m in maps.values()))
    )
    image = None
    for index, (ax, (variant, utilisation_LE)) in enumerate(zip(axes, maps.items(), strict=True)):
        image = ax.imshow(utilisation_LE, aspect="auto", cmap="RdBu_r", norm=norm)
        ax.set_title(variant)
        ax.set_xlabel("expert")
        if index % COLUMNS == 0:
            ax.set_ylabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=16, integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(nbins=12, integer=True))
        if utilisation_LE.size <= 128:
            for (layer, expert), value in np.ndenumerate(utilisation_LE):
                dark = abs(norm(value) - 0.5) > 0.3
                ax.text(
                    expert,
                    layer,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if dark else "black",
                )
    figure.colorbar(image, ax=axes, label="load / mean load (1 = balanced)", shrink=0.9)
    return _save(figure, path)


def plot_task_accuracy(
    accuracy: Mapping[str, Mapping[str, Mapping[str, tuple[float, float]]]],
    path: Path,
    colors: Mapping[str, str],
) -> Path | None:
    """Bars of per-task accuracy, seen and held-out tasks side by side (panel widths in
    proportion to their task counts).

    ``accuracy[split][variant][task] = (mean, half width)`` over seeds (half width may be nan);
    ``colors`` maps each variant to its colour (:func:`variant_colors`). Splits with no task
    are left out; None when no split has one.
    """
    splits = [s for s in TASK_SPLITS if any(accuracy.get(s, {}).values())]
    if not splits:
        return None
    tasks = {
        split: sorted({t for per_task in accuracy[split].values() for t in per_task})
        for split in splits
    }
    figure = Figure(figsize=(MAX_WIDTH_IN, 4.2), layout="constrained")
    axes = figure.subplots(
        1, len(splits), squeeze=False, width_ratios=[len(tasks[s]) + 2 for s in splits]
    )[0]
    for ax, split in zip(axes, splits, strict=True):
        by_variant = accuracy[split]
        width = 0.8 / max(len(by_variant), 1)
        x = np.arange(len(tasks[split]))
        for index, (variant, per_task) in enumerate(by_variant.items()):
            means = [per_task.get(t, (math.nan, math.nan))[0] for t in tasks[split]]
            errors = [per_task.get(t, (math.nan, math.nan))[1] for t in tasks[split]]
            errors = [0.0 if math.isnan(e) else e for e in errors]
            ax.bar(
                x + index * width,
                means,
                width,
                yerr=errors,
                capsize=2,
                label=variant,
                color=colors[variant],
            )
        ax.set_xticks(x + width * (len(by_variant) - 1) / 2, tasks[split], rotation=45, ha="right")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("accuracy")
        ax.set_title("held-out tasks" if split == "heldout" else "seen tasks")
        ax.grid(axis="y", alpha=0.3)
    _figure_legend(figure, axes)
    return _save(figure, path)
