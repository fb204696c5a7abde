"""Markdown tables for docs/mpi_study.md from the two MPI studies (runs/ written by
``moealign ablate configs/mpi_study.toml`` and ``configs/mpi_ablations.toml``).

Every cell is mean ± 95% Student-t half width over the finished seeds
(``moealign.evaluation.stats.mean_confidence_interval``); paired differences use
``moealign.evaluation.stats.paired_t_test``; steps to target use
``moealign.studies.results.steps_to_reference_loss``
with each MPI variant paired to the softmax top-k variant of the same optimizer.

    PYTHONPATH=src python3 scripts/mpi_study_summary.py [runs/mpi_study runs/mpi_ablations]
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from moealign.evaluation.stats import interval_text as interval
from moealign.evaluation.stats import paired_t_test
from moealign.studies.results import (
    RunDataError,
    RunRecord,
    RunSet,
    load_runs,
    run_results,
    steps_to_reference_loss,
)
from moealign.tables import Table, format_interval, to_markdown

OPTIMIZERS = ("adamw", "adamh", "muon", "muonh")
ROUTERS = ("softmax_topk", "mpi")
LAYERS = (0, 1)


def grid_variant(optimizer: str, router: str) -> str:
    return f"optim={optimizer},router={router}"


def final(metric: str) -> Callable[[RunRecord], float]:
    return lambda run: run_results(run).get(metric, math.nan)


def max_over_training(key: str) -> Callable[[RunRecord], float]:
    def value(run: RunRecord) -> float:
        logged = [r[key] for r in run.records("train") if isinstance(r.get(key), (int, float))]
        return max(logged) if logged else math.nan

    return value


def per_seed(run_set: RunSet, variant: str, metric: Callable[[RunRecord], float]) -> list[float]:
    return [metric(run) for run in run_set.of_variant(variant)]


def paired_delta(run_set: RunSet, variant: str, reference: str, metric: str) -> str:
    ours = {r.seed: run_results(r).get(metric) for r in run_set.of_variant(variant)}
    theirs = {r.seed: run_results(r).get(metric) for r in run_set.of_variant(reference)}
    seeds = sorted(s for s in ours.keys() & theirs.keys() if ours[s] is not None)
    if len(seeds) < 2:
        return "–"
    delta, half_width, p = paired_t_test([ours[s] for s in seeds], [theirs[s] for s in seeds])
    return f"{format_interval(delta, half_width, signed=True)} (p={p:.2f})"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    return to_markdown(Table(header, rows))


def steps_text(run_set: RunSet, variant: str, reference: str) -> str:
    try:
        target, steps = steps_to_reference_loss(run_set, variant, reference)
    except RunDataError:
        return "–"  # the reference has no finished run yet
    reached = [s for s in steps.values() if s is not None]
    text = f"{len(reached)}/{len(steps)} seeds"
    if reached:
        text += f", steps {interval(reached)}"
    return text


def lambda_over_training(run_set: RunSet, variant: str) -> dict[int, float]:
    """Mean over seeds and layers of λ at each evaluated step."""
    by_step: dict[int, list[float]] = {}
    for run in run_set.of_variant(variant):
        for record in run.records("val"):
            if "val_routing/projection_alignment" in record:
                by_step.setdefault(record["step"], []).append(
                    record["val_routing/projection_alignment"]
                )
    return {step: sum(v) / len(v) for step, v in sorted(by_step.items())}


def grid_section(run_set: RunSet) -> str:
    out = ["### Optimizer × router (Table 1 at small scale)", ""]
    rows = []
    for optimizer in OPTIMIZERS:
        softmax, mpi = (grid_variant(optimizer, r) for r in ROUTERS)
        rows.append(
            [
                optimizer,
                interval(per_seed(run_set, softmax, final("val_loss"))),
                interval(per_seed(run_set, mpi, final("val_loss"))),
                paired_delta(run_set, mpi, softmax, "val_loss"),
                interval(per_seed(run_set, softmax, final("val_ppl"))),
                interval(per_seed(run_set, mpi, final("val_ppl"))),
                steps_text(run_set, softmax, softmax),
                steps_text(run_set, mpi, softmax),
            ]
        )
    header = [
        "optimizer",
        "val loss softmax",
        "val loss MPI",
        "Δ MPI − softmax (paired)",
        "ppl softmax",
        "ppl MPI",
        "softmax: steps to own mean final loss",
        "MPI: steps to softmax's final loss",
    ]
    out += [table(header, rows), ""]
    out += ["### Routing statistics per cell", ""]
    rows = []
    for optimizer in OPTIMIZERS:
        for router in ROUTERS:
            variant = grid_variant(optimizer, router)
            rows.append(
                [
                    f"{optimizer} + {router}",
                    interval(per_seed(run_set, variant, final("train_mean/balance_loss"))),
                    interval(per_seed(run_set, variant, final("train_mean/routing/max_vio"))),
                    interval(per_seed(run_set, variant, final("val_routing/max_vio_batch"))),
                    interval(per_seed(run_set, variant, final("val_routing/max_vio"))),
                    *(
                        interval(
                            per_seed(
                                run_set,
                                variant,
                                final(f"val_routing/layer{layer}/projection_alignment"),
                            )
                        )
                        for layer in LAYERS
                    ),
                    interval(per_seed(run_set, variant, final("tokens_per_s"))),
                ]
            )
    header = [
        "cell",
        "balance loss (train mean)",
        "MaxVio batch (train mean)",
        "MaxVio batch (val)",
        "MaxVio global (val)",
        "λ layer 0",
        "λ layer 1",
        "tokens/s",
    ]
    out += [table(header, rows), ""]
    out += ["### Projection alignment λ over training (mean over layers and seeds)", ""]
    curves = {
        f"{o} + {r}": lambda_over_training(run_set, grid_variant(o, r))
        for o in OPTIMIZERS
        for r in ROUTERS
    }
    steps = sorted({s for curve in curves.values() for s in curve})
    shown = [s for s in steps if s in (25, 50, 100, 150, 200) or s == steps[-1]]
    rows = [
        [name, *(f"{curve[s]:.3f}" if s in curve else "–" for s in shown)]
        for name, curve in curves.items()
    ]
    out += [table(["cell", *(f"step {s}" for s in shown)], rows), ""]
    return "\n".join(out)


def ablation_section(run_set: RunSet) -> str:
    out = ["### MPI ablations (AdamW unless named)", ""]
    rows = []
    for variant in run_set.variants:
        runs = run_set.of_variant(variant, status=None)
        statuses = [r.status for r in runs]
        diverged = [f"seed {r.seed} at step {r.diverged_step}" for r in runs if r.diverged_step]
        status = f"{statuses.count('finished')}/{len(runs)} finished"
        if diverged:
            status += "; diverged: " + ", ".join(diverged)
        rows.append(
            [
                variant,
                status,
                interval(per_seed(run_set, variant, final("val_loss"))),
                "–" if variant == "mpi" else paired_delta(run_set, variant, "mpi", "val_loss"),
                interval(per_seed(run_set, variant, final("val_ppl"))),
                interval(per_seed(run_set, variant, final("val_routing/projection_alignment"))),
                interval(per_seed(run_set, variant, final("train_mean/routing/max_vio"))),
                interval(per_seed(run_set, variant, final("val_routing/max_vio"))),
                interval(per_seed(run_set, variant, max_over_training("grad_norm"))),
                interval(per_seed(run_set, variant, final("tokens_per_s"))),
            ]
        )
    header = [
        "variant",
        "runs",
        "val loss",
        "Δ vs mpi (paired)",
        "ppl",
        "λ (mean of layers)",
        "MaxVio batch (train)",
        "MaxVio global (val)",
        "max grad norm",
        "tokens/s",
    ]
    out += [table(header, rows), ""]
    if "softmax_topk" in run_set.variants:
        rows = [
            [variant, steps_text(run_set, variant, "softmax_topk")]
            for variant in run_set.variants
            if variant != "softmax_topk"
        ]
        out += [
            "Steps to the softmax top-k router's mean final validation loss:",
            "",
            table(["variant", "reached"], rows),
            "",
        ]
    return "\n".join(out)


NO_RETRACTION_PAIRS = {
    "mpi_no_retract": "adamw",
    "mpi_no_retract_muon": "muon",
    "mpi_no_retract_muonh": "muonh",
}


def no_retraction_section(run_set: RunSet) -> str:
    """Each no-retraction variant against the MPI cell of its own optimizer (same seeds)."""
    rows = []
    for variant, optimizer in NO_RETRACTION_PAIRS.items():
        reference = grid_variant(optimizer, "mpi")
        row = [optimizer, paired_delta(run_set, variant, reference, "val_loss")]
        for metric in (final("val_routing/max_vio"), max_over_training("grad_norm")):
            row += [
                interval(per_seed(run_set, reference, metric)),
                interval(per_seed(run_set, variant, metric)),
            ]
        rows.append(row)
    header = [
        "optimizer",
        "Δ val loss (no retraction − MPI)",
        "MaxVio global MPI",
        "MaxVio global no retraction",
        "max grad norm MPI",
        "max grad norm no retraction",
    ]
    return "\n".join(
        ["### No retraction against MPI with the same optimizer", "", table(header, rows), ""]
    )


def main(argv: Sequence[str]) -> None:
    study = Path(argv[0]) if argv else Path("runs/mpi_study")
    ablations = Path(argv[1]) if len(argv) > 1 else Path("runs/mpi_ablations")
    if study.exists():
        print(grid_section(load_runs([study])))
    if ablations.exists():
        print(ablation_section(load_runs([ablations])))
    if study.exists() and ablations.exists():
        print(no_retraction_section(load_runs([study, ablations])))


if __name__ == "__main__":
    main(sys.argv[1:])
