"""CTGI and transfer ratio of a study variant against its baseline, from per-example answers.

For each held-out task t (the final evaluation's ``heldout_tasks`` and ``heldout_compositions``
sets) and each seed run by both variants, ``final_eval.json["tasks"]`` holds one 0/1
correctness per example. Runs of the same seed answer the same examples (checked on the
references), so the two variants' arrays are paired example by example; per task the seeds'
arrays are stacked, one row per seed. Then (DESIGN.md §7, :func:`moealign.evaluation.ctgi.ctgi`)

    A(t) = mean over seeds and examples,  G(t) = (A_m(t) − A_b(t)) / (U − A_b(t)),  U = 1,
    CTGI = mean over held-out tasks with U − A_b(t) ≥ 1 point of G(t),

with the paired hierarchical percentile bootstrap 95% interval: each replicate draws the seeds
with replacement, then the examples of each task, once for all seeds where every seed answered
the same examples, else per drawn seed
(:func:`moealign.evaluation.stats.hierarchical_bootstrap_means`), so that the interval holds
the seed-to-seed variance, not only the example sampling; and the transfer ratio
TR = mean_t∈held-out (A_m − A_b) / mean_t∈seen (A_m − A_b) on the
seen-task test split (:func:`moealign.evaluation.ctgi.transfer_ratio`; undefined when the in-domain
gain is 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from moealign.evaluation.ctgi import CTGIResult, ctgi, transfer_ratio
from moealign.evaluation.tasks import HELDOUT_SETS
from moealign.studies.results import RunRecord, RunSet

__all__ = ["PairedAnswers", "VariantTransfer", "paired_task_answers", "variant_transfer"]

SEEN_SET = "test"
_ZERO_GAIN = 1e-12


def _task_answers(run: RunRecord, sets: Sequence[str]) -> dict[str, dict]:
    """task → its ``final_eval["tasks"]["sets"][set]["tasks"][task]`` record over ``sets``."""
    recorded = run.final_eval.get("tasks", {}).get("sets", {})
    return {
        task: result
        for name in sets
        for task, result in recorded.get(name, {}).get("tasks", {}).items()
    }


@dataclass(frozen=True)
class PairedAnswers:
    """Per task, (seeds × examples) correctness of a variant and its baseline, one row per
    shared seed (``seeds``, ascending); ``shared_examples``: every seed answered the same
    examples of every task (the bootstrap then draws examples once for all seeds)."""

    model: dict[str, np.ndarray]
    baseline: dict[str, np.ndarray]
    seeds: list[int]
    shared_examples: bool


def paired_task_answers(
    model_runs: Sequence[RunRecord], baseline_runs: Sequence[RunRecord], sets: Sequence[str]
) -> PairedAnswers:
    """Per task of ``sets``, the model's and the baseline's per-example correctness, paired by
    seed (same seed → same examples), one row per shared seed.

    Only seeds where both runs recorded per-example answers count, and only tasks every such
    pair recorded. Raises ``ValueError`` when a pair scored different examples of a task, or
    when seeds scored different numbers of examples of a task.
    """
    baseline_by_seed = {run.seed: run for run in baseline_runs}
    pairs = []
    for run in sorted(model_runs, key=lambda r: r.seed):
        base = baseline_by_seed.get(run.seed)
        if base is None:
            continue
        ours, theirs = _task_answers(run, sets), _task_answers(base, sets)
        if ours and theirs:
            pairs.append((run.seed, ours, theirs))
    if not pairs:
        return PairedAnswers({}, {}, [], False)
    tasks = sorted(set.intersection(*(set(o) & set(t) for _, o, t in pairs)))
    model: dict[str, list[np.ndarray]] = {task: [] for task in tasks}
    baseline: dict[str, list[np.ndarray]] = {task: [] for task in tasks}
    shared = all(len({str(o[t].get("references")) for _, o, _ in pairs}) == 1 for t in tasks)
    for seed, ours, theirs in pairs:
        for task in tasks:
            if ours[task].get("references") != theirs[task].get("references"):
                raise ValueError(
                    f"seed {seed}, task {task!r}: the variant and its baseline answered different "
                    "examples (references differ); runs of one seed must share data.seed and "
                    "train.task_eval_examples"
                )
            model[task].append(np.asarray(ours[task]["correct"], dtype=np.float64))
            baseline[task].append(np.asarray(theirs[task]["correct"], dtype=np.float64))
    for task, arrays in model.items():
        if len({array.size for array in arrays}) != 1:
            raise ValueError(
                f"task {task!r}: the seeds answered different numbers of examples "
                f"({[array.size for array in arrays]}); runs must share "
                "train.task_eval_examples"
            )
    return PairedAnswers(
        {task: np.stack(arrays) for task, arrays in model.items()},
        {task: np.stack(arrays) for task, arrays in baseline.items()},
        [seed for seed, _, _ in pairs],
        shared,
    )


@dataclass(frozen=True)
class VariantTransfer:
    """A variant against its baseline: mean accuracy gains (fractions), CTGI, TR.

    ``ctgi`` is None when no held-out task has headroom (``note`` says why); ``transfer_ratio``
    is NaN when the in-domain gain is 0 or there is no seen-task split.
    """

    variant: str
    baseline: str
    seeds: list[int]
    heldout_gain: float
    indomain_gain: float
    transfer_ratio: float
    ctgi: CTGIResult | None
    per_task_gain: dict[str, float] = field(default_factory=dict)
    note: str = ""


def _mean_gain(model: dict[str, np.ndarray], baseline: dict[str, np.ndarray]) -> float:
    """Mean over tasks of A_m(t) − A_b(t); a rounding residue (|gain| < 1e-12) is 0, so that
    equal accuracies give a zero gain and no spurious transfer ratio."""
    if not model:
        return math.nan
    gain = float(np.mean([model[t].mean() - baseline[t].mean() for t in model]))
    return 0.0 if abs(gain) < _ZERO_GAIN else gain


def variant_transfer(
    run_set: RunSet,
    variant: str,
    baseline: str,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> VariantTransfer | None:
    """CTGI (upper bound 1, 1-point headroom rule) with its hierarchical paired bootstrap
    interval, and the
    transfer ratio, of ``variant`` against ``baseline`` (module docstring). None when the two
    share no seed with per-example held-out answers."""
    model_runs, base_runs = run_set.of_variant(variant), run_set.of_variant(baseline)
    heldout = paired_task_answers(model_runs, base_runs, HELDOUT_SETS)
    heldout_m, heldout_b = heldout.model, heldout.baseline
    if not heldout_m:
        return None
    seen = paired_task_answers(model_runs, base_runs, (SEEN_SET,))
    seen_m, seen_b = seen.model, seen.baseline
    heldout_gain, indomain_gain = _mean_gain(heldout_m, heldout_b), _mean_gain(seen_m, seen_b)
    ratio = (
        transfer_ratio(heldout_gain, indomain_gain) + 0.0  # + 0.0: no "-0" for a zero gain
        if math.isfinite(indomain_gain) and indomain_gain != 0.0
        else math.nan
    )
    try:
        result = ctgi(
            heldout_m,
            heldout_b,
            upper_bound=1.0,
            min_headroom=0.01,
            n_resamples=n_resamples,
            confidence=confidence,
            seed=seed,
            shared_examples=heldout.shared_examples,
        )
        note = ""
    except ValueError as err:
        result, note = None, str(err)
    return VariantTransfer(
        variant=variant,
        baseline=baseline,
        seeds=heldout.seeds,
        heldout_gain=heldout_gain,
        indomain_gain=indomain_gain,
        transfer_ratio=ratio,
        ctgi=result,
        per_task_gain={t: float(heldout_m[t].mean() - heldout_b[t].mean()) for t in heldout_m},
        note=note,
    )
