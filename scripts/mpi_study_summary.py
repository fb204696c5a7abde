"""Markdown tables for docs/mpi_study.md from the MPI studies (runs/ written by
``moealign ablate`` with ``configs/mpi_study.toml``, ``configs/mpi_ablations.toml`` and
``configs/mpi_finegrained.toml``).

Every cell is mean ± 95% Student-t half width over the finished seeds
(``moealign.evaluation.stats.mean_confidence_interval``); paired differences use
``moealign.evaluation.verdicts.paired_comparison``: Δ ± 95% t half width, raw and Holm p (the
tests of one table are one family) and the outcome — lower / higher / equivalent within ±m (TOST;
m = 0.01 nats for validation losses, none elsewhere) / inconclusive;
steps to target use ``moealign.studies.results.steps_to_reference_loss`` /
``time_to_target`` with each MPI variant paired to the softmax top-k variant of the same
optimizer. The projection alignment λ (MPI paper Eq. 11) is given for the powered rows R′ (the
rows that route) and the stored rows R, at step 0 (the validation record before the first
update), at the end, and as the per-seed change from step 0.

    PYTHONPATH=src python3 scripts/mpi_study_summary.py [--study DIR] [--ablations DIR]
        [--finegrained DIR]
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from moealign.evaluation.stats import interval_text as interval
from moealign.evaluation.verdicts import (
    Comparison,
    default_margin,
    judged_rows,
    outcome_legend,
    paired_comparison,
)
from moealign.studies.results import (
    RunDataError,
    RunRecord,
    RunSet,
    load_runs,
    run_results,
    steps_to_reference_loss,
    time_to_target,
)
from moealign.tables import Table, to_markdown

OPTIMIZERS = ("adamw", "adamh", "muon", "muonh")
ROUTERS = ("softmax_topk", "mpi")
LAYERS = (0, 1)
LAMBDA = {  # label: the validation key (mean over layers)
    "λ′ (R′, powered)": "val_routing/projection_alignment",
    "λ (R, raw)": "val_routing/projection_alignment_raw",
}


def grid_variant(optimizer: str, router: str) -> str:
    return f"optim={optimizer},router={router}"


def final(metric: str) -> Callable[[RunRecord], float]:
    return lambda run: run_results(run).get(metric, math.nan)


def at_step0(metric: str) -> Callable[[RunRecord], float]:
    """``metric`` (a layer-mean ``val_routing/...`` key) at the step-0 validation record."""
    return final(f"step0/{metric}")


def change_from_step0(metric: str) -> Callable[[RunRecord], float]:
    """Final − step 0 of ``metric`` (``run_results``' ``change_from_step0/...``)."""
    return final(f"change_from_step0/{metric}")


def steps_to(target: float) -> Callable[[RunRecord], float]:
    """First evaluated step with val_loss ≤ ``target``; NaN if never reached."""

    def value(run: RunRecord) -> float:
        reached = time_to_target(run, target)
        return float(reached[0]) if reached else math.nan

    return value


def mean_val_loss_at(run_set: RunSet, variant: str, step: int) -> float:
    losses = [
        r["val_loss"]
        for run in run_set.of_variant(variant)
        for r in run.records("val")
        if r["step"] == step
    ]
    return sum(losses) / len(losses) if losses else math.nan


def max_over_training(key: str) -> Callable[[RunRecord], float]:
    def value(run: RunRecord) -> float:
        logged = [r[key] for r in run.records("train") if isinstance(r.get(key), (int, float))]
        return max(logged) if logged else math.nan

    return value


def per_seed(run_set: RunSet, variant: str, metric: Callable[[RunRecord], float]) -> list[float]:
    return [metric(run) for run in run_set.of_variant(variant)]


def delta_text(
    ours: Sequence[float], theirs: Sequence[float], margin: float | None = None
) -> Comparison | str:
    """Paired Δ = ours − theirs over the pairs with both values finite (a Comparison that
    :func:`table` writes out, Holm-adjusted over its table), or "–" with fewer than 2 pairs."""
    pairs = [
        (a, b) for a, b in zip(ours, theirs, strict=True) if math.isfinite(a) and math.isfinite(b)
    ]
    if len(pairs) < 2:
        return "–"
    return paired_comparison(*zip(*pairs, strict=True), margin=margin)


def paired_delta(
    run_set: RunSet,
    variant: str,
    reference: str,
    metric: Callable[[RunRecord], float],
    margin: float | None = None,
) -> Comparison | str:
    ours = {r.seed: metric(r) for r in run_set.of_variant(variant)}
    theirs = {r.seed: metric(r) for r in run_set.of_variant(reference)}
    seeds = sorted(ours.keys() & theirs.keys())
    return delta_text([ours[s] for s in seeds], [theirs[s] for s in seeds], margin)


LOSS_MARGIN = default_margin("val_loss")


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table; its paired differences Holm-adjusted as one family."""
    return to_markdown(Table(header, judged_rows(rows)))


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


def lambda_over_training(run_set: RunSet, variant: str, key: str) -> dict[int, float]:
    """Mean over seeds and layers of λ (validation ``key``) at each evaluated step."""
    by_step: dict[int, list[float]] = {}
    for run in run_set.of_variant(variant):
        for record in run.records("val"):
            if key in record:
                by_step.setdefault(record["step"], []).append(record[key])
    return {step: sum(v) / len(v) for step, v in sorted(by_step.items())}


def lambda_curves_table(run_set: RunSet, cells: dict[str, str], shown: Sequence[int]) -> str:
    """λ′ and raw λ at the ``shown`` steps (and the last), one row per (cell, rows)."""
    rows, steps = [], set()
    for label, key in LAMBDA.items():
        for name, variant in cells.items():
            curve = lambda_over_training(run_set, variant, key)
            steps |= set(curve)
            rows.append((f"{name}: {label}", curve))
    columns = [s for s in sorted(steps) if s in shown or s == max(steps)]
    body = [[name, *(f"{c[s]:.3f}" if s in c else "–" for s in columns)] for name, c in rows]
    return table(["cell: rows", *(f"step {s}" for s in columns)], body)


def lambda_from_step0_table(run_set: RunSet, optimizers: Sequence[str]) -> str:
    """Per cell: λ′ and raw λ at step 0 and at the end, the paired change from step 0, and
    the MPI − softmax difference of that change (paired by seed)."""
    rows = []
    for optimizer in optimizers:
        softmax, mpi = (grid_variant(optimizer, r) for r in ROUTERS)
        for router, variant in zip(ROUTERS, (softmax, mpi), strict=True):
            row = [f"{optimizer} + {router}"]
            for key in LAMBDA.values():
                start = per_seed(run_set, variant, at_step0(key))
                end = per_seed(run_set, variant, final(key))
                row += [interval(start), interval(end), delta_text(end, start)]
            rows.append(row)
        row = [f"{optimizer}: MPI − softmax"]
        for key in LAMBDA.values():
            row += [
                paired_delta(run_set, mpi, softmax, at_step0(key)),
                paired_delta(run_set, mpi, softmax, final(key)),
                paired_delta(run_set, mpi, softmax, change_from_step0(key)),
            ]
        rows.append(row)
    header = ["cell"]
    for label in LAMBDA:
        header += [f"{label} step 0", f"{label} final", f"{label} change from step 0"]
    return table(header, rows)


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
                paired_delta(run_set, mpi, softmax, final("val_loss"), LOSS_MARGIN),
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
    out += ["### Projection alignment λ from step 0 (mean over layers)", ""]
    out += [lambda_from_step0_table(run_set, OPTIMIZERS), ""]
    out += ["### Projection alignment λ over training (mean over layers and seeds)", ""]
    cells = {f"{o} + {r}": grid_variant(o, r) for o in OPTIMIZERS for r in ROUTERS}
    out += [lambda_curves_table(run_set, cells, (0, 25, 50, 100, 150, 200)), ""]
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
                "–"
                if variant == "mpi"
                else paired_delta(run_set, variant, "mpi", final("val_loss"), LOSS_MARGIN),
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
        row: list = [
            optimizer,
            paired_delta(run_set, variant, reference, final("val_loss"), LOSS_MARGIN),
        ]
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


FINEGRAINED_OPTIMIZERS = ("adamw", "muonh")


def router_comparison_table(run_set: RunSet, optimizer: str) -> str:
    """Softmax top-k against MPI with one optimizer: one row per measure, each router's mean ±
    95% t half width over seeds and the paired difference MPI − softmax."""
    softmax, mpi = (grid_variant(optimizer, r) for r in ROUTERS)
    evaluated = {r["step"] for run in run_set.of_variant(softmax) for r in run.records("val")}
    steps = max(evaluated)
    half = min(evaluated, key=lambda step: abs(step - steps / 2))
    final_losses = [v for v in per_seed(run_set, softmax, final("val_loss")) if math.isfinite(v)]
    final_target = sum(final_losses) / len(final_losses)
    half_target = mean_val_loss_at(run_set, softmax, half)
    measures: list[tuple[str, Callable[[RunRecord], float]]] = [
        ("final val loss", final("val_loss")),
        ("final val ppl", final("val_ppl")),
        (
            f"steps to softmax's mean loss at step {half} ({half_target:.3f})",
            steps_to(half_target),
        ),
        (f"steps to softmax's mean final loss ({final_target:.3f})", steps_to(final_target)),
        ("balance loss (train mean)", final("train_mean/balance_loss")),
        ("balance loss (val, final)", final("val_routing/balance_loss")),
        ("MaxVio batch (train mean)", final("train_mean/routing/max_vio")),
        ("MaxVio batch (val, final)", final("val_routing/max_vio_batch")),
        ("MaxVio global (val, final)", final("val_routing/max_vio")),
        ("MaxVio global (val, step 0)", at_step0("val_routing/max_vio")),
        ("dead experts per layer (val, final)", final("val_routing/dead_experts")),
    ]
    for label, key in LAMBDA.items():
        measures += [
            (f"{label} step 0", at_step0(key)),
            (f"{label} final", final(key)),
            (f"{label} change from step 0", change_from_step0(key)),
        ]
    rows = [
        [
            label,
            interval(per_seed(run_set, softmax, metric)),
            interval(per_seed(run_set, mpi, metric)),
            paired_delta(
                run_set, mpi, softmax, metric, LOSS_MARGIN if "val loss" in label else None
            ),
        ]
        for label, metric in measures
    ]
    return table(["measure", "softmax top-k", "MPI", "Δ MPI − softmax (paired)"], rows)


def finegrained_section(run_set: RunSet) -> str:
    out = []
    for optimizer in FINEGRAINED_OPTIMIZERS:
        if all(run_set.of_variant(grid_variant(optimizer, r)) for r in ROUTERS):
            out += [f"#### {optimizer}", "", router_comparison_table(run_set, optimizer), ""]
        else:
            out += [f"#### {optimizer}", "", "(no finished run of one of the routers yet)", ""]
    out += ["#### λ over training (mean over layers and seeds)", ""]
    cells = {f"{o} + {r}": grid_variant(o, r) for o in FINEGRAINED_OPTIMIZERS for r in ROUTERS}
    out += [lambda_curves_table(run_set, cells, (0, 100, 200, 500, 1000)), ""]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, default=Path("runs/mpi_study"))
    parser.add_argument("--ablations", type=Path, default=Path("runs/mpi_ablations"))
    parser.add_argument("--finegrained", type=Path, default=Path("runs/mpi_finegrained"))
    args = parser.parse_args()
    print(outcome_legend() + " Here only validation-loss differences have a margin.\n")
    if args.study.exists():
        print(grid_section(load_runs([args.study])))
    if args.ablations.exists():
        print(ablation_section(load_runs([args.ablations])))
    if args.study.exists() and args.ablations.exists():
        print(no_retraction_section(load_runs([args.study, args.ablations])))
    if args.finegrained.exists():
        print(finegrained_section(load_runs([args.finegrained])))


if __name__ == "__main__":
    main()
