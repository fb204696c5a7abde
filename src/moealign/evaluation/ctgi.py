"""Cross-task generalisation index (CTGI) and transfer ratio.

Our definition (DESIGN.md §7; research-roma.md §3.1 — a proposal, not from any paper). For a
method m, the baseline MoE b and an upper bound U (oracle-routing accuracy, or 100%), per
held-out task t with accuracy A(t):

    G_m(t) = (A_m(t) − A_b(t)) / (U(t) − A_b(t))        (normalised gain)
    CTGI_m = mean over held-out tasks t of G_m(t)

0 = no transfer, 1 = reaches the upper bound, < 0 = negative transfer. Tasks whose headroom
U(t) − A_b(t) is below ``min_headroom`` are flagged and excluded (the ratio is unstable there);
``min_headroom`` is in the same units as the accuracies (0.01 for fractions = 1 point, 1.0 for
percentages). The 95% interval is a paired percentile bootstrap over examples: within each task
the same resampled items score model, baseline and upper bound.

Companion scalar: transfer ratio TR_m = mean held-out gain (A_m − A_b) / mean in-domain gain.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from moealign.evaluation.stats import bootstrap_indices, percentile_interval


@dataclass(frozen=True)
class CTGIEstimate:
    """CTGI point estimate.

    ``per_task_gain``: G_m(t) of the included tasks; ``excluded_tasks``: task → headroom
    U(t) − A_b(t) for the tasks left out because the headroom is below ``min_headroom``.
    """

    value: float
    per_task_gain: dict[str, float]
    excluded_tasks: dict[str, float]


@dataclass(frozen=True)
class CTGIResult(CTGIEstimate):
    """CTGI with its paired bootstrap percentile interval [ci_low, ci_high]."""

    ci_low: float
    ci_high: float
    confidence: float


def normalized_gain(
    model_accuracy: float | np.ndarray,
    baseline_accuracy: float | np.ndarray,
    upper_bound: float | np.ndarray,
) -> float | np.ndarray:
    """G = (A_m − A_b) / (U − A_b), elementwise. DESIGN.md §7."""
    return (model_accuracy - baseline_accuracy) / (upper_bound - baseline_accuracy)


def _below_headroom(headroom: float, min_headroom: float) -> bool:
    # isclose keeps a task with exactly min_headroom (e.g. 0.03 − 0.02 = 0.00999...) included.
    return headroom < min_headroom and not math.isclose(headroom, min_headroom)


def _check_same_tasks(model: Mapping, baseline: Mapping, upper_bound: object) -> list[str]:
    if not model:
        raise ValueError("no tasks given: the model's per-task mapping is empty")
    if set(model) != set(baseline):
        raise ValueError(
            f"model and baseline must cover the same tasks, got {sorted(model)} and "
            f"{sorted(baseline)}"
        )
    if isinstance(upper_bound, Mapping) and set(upper_bound) != set(model):
        raise ValueError(
            f"upper_bound must cover the same tasks as the model, got {sorted(upper_bound)} "
            f"for tasks {sorted(model)}"
        )
    return sorted(model)


def _task_upper_bound(upper_bound: float | Mapping, task: str):
    return upper_bound[task] if isinstance(upper_bound, Mapping) else upper_bound


def ctgi_from_accuracies(
    model_accuracy: Mapping[str, float],
    baseline_accuracy: Mapping[str, float],
    *,
    upper_bound: float | Mapping[str, float],
    min_headroom: float,
) -> CTGIEstimate:
    """CTGI from per-task accuracies (no interval), e.g. for published tables.

    ``upper_bound``, ``min_headroom`` and the accuracies share one unit (fractions or percent);
    ``upper_bound`` is one value for all tasks or a per-task mapping (oracle accuracies).
    """
    tasks = _check_same_tasks(model_accuracy, baseline_accuracy, upper_bound)
    per_task_gain: dict[str, float] = {}
    excluded_tasks: dict[str, float] = {}
    for task in tasks:
        upper = float(_task_upper_bound(upper_bound, task))
        headroom = upper - float(baseline_accuracy[task])
        if _below_headroom(headroom, min_headroom):
            excluded_tasks[task] = headroom
        else:
            per_task_gain[task] = float(
                normalized_gain(float(model_accuracy[task]), float(baseline_accuracy[task]), upper)
            )
    if not per_task_gain:
        raise ValueError(
            f"every task has headroom U − A_b below min_headroom={min_headroom}: {excluded_tasks}"
        )
    return CTGIEstimate(
        value=float(np.mean(list(per_task_gain.values()))),
        per_task_gain=per_task_gain,
        excluded_tasks=excluded_tasks,
    )


def _per_example(values: Sequence[float] | np.ndarray, name: str, task: str) -> np.ndarray:
    values_N = np.asarray(values, dtype=np.float64)
    if values_N.ndim != 1 or values_N.size == 0:
        raise ValueError(
            f"{name}[{task!r}] must be a non-empty 1-D array of per-example scores, got shape "
            f"{values_N.shape}"
        )
    return values_N


def ctgi(
    per_task_model: Mapping[str, Sequence[float] | np.ndarray],
    per_task_baseline: Mapping[str, Sequence[float] | np.ndarray],
    upper_bound: float | Mapping[str, Sequence[float] | np.ndarray | float] = 1.0,
    min_headroom: float = 0.01,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> CTGIResult:
    """CTGI over held-out tasks with a paired bootstrap interval. DESIGN.md §7.

    ``per_task_model[t]`` and ``per_task_baseline[t]`` hold per-example correctness (0/1, or
    scores) on the same examples of task t; A(t) is their mean. ``upper_bound`` is a constant
    (1.0 = 100% for 0/1 correctness), or per task either a constant or the oracle's per-example
    correctness on the same examples. Tasks with U(t) − A_b(t) < ``min_headroom`` (same units as
    the accuracies; 0.01 = 1 point) on the full data are excluded and listed in
    ``excluded_tasks``.

    Bootstrap: for each of ``n_resamples`` replicates and each included task, draw that task's
    examples with replacement, apply the same indices to model, baseline and an oracle upper
    bound, recompute the accuracies and CTGI; the interval is the percentile interval of the
    replicates. If a replicate leaves a task with zero headroom the gain is inf/nan and so may
    the interval be: raise ``min_headroom`` or use more examples.
    """
    if n_resamples <= 0:
        raise ValueError(f"n_resamples must be a positive number of replicates, got {n_resamples}")
    tasks = _check_same_tasks(per_task_model, per_task_baseline, upper_bound)
    scores_by_task: dict[str, np.ndarray] = {}  # rows: model, baseline[, oracle]; (S, N)
    upper_constant: dict[str, float] = {}
    for task in tasks:
        rows = [
            _per_example(per_task_model[task], "per_task_model", task),
            _per_example(per_task_baseline[task], "per_task_baseline", task),
        ]
        upper = _task_upper_bound(upper_bound, task)
        if np.ndim(upper) == 0:
            upper_constant[task] = float(upper)
        else:
            rows.append(_per_example(upper, "upper_bound", task))
        if len({row.size for row in rows}) != 1:
            raise ValueError(
                f"task {task!r}: model, baseline and upper bound must score the same examples, "
                f"got lengths {[row.size for row in rows]}"
            )
        scores_by_task[task] = np.stack(rows)

    def upper_accuracy(task: str, accuracy_RS: np.ndarray) -> np.ndarray:
        return upper_constant[task] if task in upper_constant else accuracy_RS[..., 2]

    accuracy_by_task = {task: scores_SN.mean(axis=1) for task, scores_SN in scores_by_task.items()}
    estimate = ctgi_from_accuracies(
        {task: acc_S[0] for task, acc_S in accuracy_by_task.items()},
        {task: acc_S[1] for task, acc_S in accuracy_by_task.items()},
        upper_bound={task: upper_accuracy(task, acc_S) for task, acc_S in accuracy_by_task.items()},
        min_headroom=min_headroom,
    )

    rng = np.random.default_rng(seed)
    gain_sum_R = np.zeros(n_resamples)
    for task in estimate.per_task_gain:
        scores_SN = scores_by_task[task]
        accuracy_RS = np.concatenate(
            [
                np.stack([row_N[index_RN].mean(axis=1) for row_N in scores_SN], axis=1)
                for index_RN in bootstrap_indices(scores_SN.shape[1], n_resamples, rng)
            ]
        )
        with np.errstate(divide="ignore", invalid="ignore"):
            gain_sum_R += normalized_gain(
                accuracy_RS[:, 0], accuracy_RS[:, 1], upper_accuracy(task, accuracy_RS)
            )
    ci_low, ci_high = percentile_interval(gain_sum_R / len(estimate.per_task_gain), confidence)
    return CTGIResult(
        value=estimate.value,
        per_task_gain=estimate.per_task_gain,
        excluded_tasks=estimate.excluded_tasks,
        ci_low=ci_low,
        ci_high=ci_high,
        confidence=confidence,
    )


def transfer_ratio(
    heldout_gain: float | Sequence[float], indomain_gain: float | Sequence[float]
) -> float:
    """TR = mean held-out gain (A_m − A_b) / mean in-domain gain (A_m − A_b). DESIGN.md §7.

    Each argument is a mean gain or the per-task gains to average. TR is the fraction of the
    in-domain improvement that survives on unseen tasks.
    """
    indomain_mean = float(np.mean(indomain_gain))
    if indomain_mean == 0.0:
        raise ValueError(
            f"indomain_gain must have a non-zero mean (the ratio's denominator), got "
            f"{indomain_gain}"
        )
    return float(np.mean(heldout_gain)) / indomain_mean
