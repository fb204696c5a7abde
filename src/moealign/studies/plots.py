"""Report figures (matplotlib, Agg, PNG): training curves with seed bands, expert-utilisation
heatmaps, routing statistics over training, schedules, per-task accuracy bars.

Curves of a variant are drawn as the mean over its finished seeds at the steps every seed
logged, with a band from the minimum to the maximum over seeds. Each function writes one PNG
and returns its path, or None when no run has the data (the report then says so).
Figures are built with :class:`matplotlib.figure.Figure` (no pyplot state, no GUI backend).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from moealign.evaluation import diagnostics
from moealign.studies.results import TASK_SPLITS, RunRecord

__all__ = [
    "variant_colors",
    "plot_curves",
    "plot_expert_utilisation",
    "plot_task_accuracy",
    "seed_curve",
]

VariantRuns = Mapping[str, Sequence[RunRecord]]


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


def _band(ax: Axes, label: str, runs: Sequence[RunRecord], key: str, split: str, **style) -> bool:
    curve = seed_curve(runs, key, split)
    if curve is None:
        return False
    steps, values_SN = curve
    (line,) = ax.plot(steps, values_SN.mean(0), label=f"{label} (n={len(values_SN)})", **style)
    if len(values_SN) > 1:
        ax.fill_between(
            steps, values_SN.min(0), values_SN.max(0), color=line.get_color(), alpha=0.2
        )
    return True


def _legend(ax: Axes) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=110, bbox_inches="tight")
    return path


def plot_curves(
    variants: VariantRuns,
    panels: Sequence[tuple[str, str, str]],
    path: Path,
    title: str,
) -> Path | None:
    """One panel per (metric key, split, y label) with a seed band per variant; panels no run
    logged are dropped. Returns None when every panel is empty."""
    colors = variant_colors(list(variants))
    drawn = [
        (key, split, ylabel)
        for key, split, ylabel in panels
        if any(seed_curve(runs, key, split) for runs in variants.values())
    ]
    if not drawn:
        return None
    figure = Figure(figsize=(5.5 * len(drawn), 3.8))
    axes = figure.subplots(1, len(drawn), squeeze=False)[0]
    for ax, (key, split, ylabel) in zip(axes, drawn, strict=True):
        for variant, runs in variants.items():
            _band(ax, variant, runs, key, split, color=colors[variant])
        _legend(ax)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{split}: {key}", fontsize=9)
        ax.grid(alpha=0.3)
    figure.suptitle(title)
    return _save(figure, path)


def plot_expert_utilisation(variants: VariantRuns, path: Path) -> Path | None:
    """Heatmap per variant of load_e / mean_e load_e (DESIGN.md §4 diagnostics; 1 = balanced)
    by layer and expert, from ``final_eval.json``'s ``expert_counts``, averaged over seeds."""
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
    figure = Figure(figsize=(4.2 * len(maps), 0.5 * max(m.shape[0] for m in maps.values()) + 2.2))
    axes = figure.subplots(1, len(maps), squeeze=False)[0]
    high = max(float(m.max()) for m in maps.values())
    for ax, (variant, utilisation_LE) in zip(axes, maps.items(), strict=True):
        image = ax.imshow(utilisation_LE, aspect="auto", cmap="viridis", vmin=0.0, vmax=high)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_xticks(range(utilisation_LE.shape[1]))
        ax.set_yticks(range(utilisation_LE.shape[0]))
        ax.set_title(variant, fontsize=9)
        figure.colorbar(image, ax=ax, label="load / mean load")
    return _save(figure, path)


def plot_task_accuracy(
    accuracy: Mapping[str, Mapping[str, Mapping[str, tuple[float, float]]]],
    path: Path,
    colors: Mapping[str, str],
) -> Path | None:
    """Bars of per-task accuracy, seen and held-out tasks side by side.

    ``accuracy[split][variant][task] = (mean, half width)`` over seeds (half width may be nan);
    ``colors`` maps each variant to its colour (:func:`variant_colors`).
    """
    splits = [s for s in TASK_SPLITS if any(accuracy.get(s, {}).values())]
    if not splits:
        return None
    figure = Figure(figsize=(6.5 * len(splits), 4.0))
    axes = figure.subplots(1, len(splits), squeeze=False)[0]
    for ax, split in zip(axes, splits, strict=True):
        by_variant = accuracy[split]
        tasks = sorted({t for per_task in by_variant.values() for t in per_task})
        width = 0.8 / max(len(by_variant), 1)
        x = np.arange(len(tasks))
        for index, (variant, per_task) in enumerate(by_variant.items()):
            means = [per_task.get(t, (math.nan, math.nan))[0] for t in tasks]
            errors = [per_task.get(t, (math.nan, math.nan))[1] for t in tasks]
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
        ax.set_xticks(x + width * (len(by_variant) - 1) / 2, tasks, rotation=45, ha="right")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("accuracy")
        ax.set_title("held-out tasks" if split == "heldout" else "seen tasks")
        ax.grid(axis="y", alpha=0.3)
        _legend(ax)
    return _save(figure, path)
