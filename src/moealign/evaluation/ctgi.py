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
the same resampled items score model, baseline and upper bound. Per-example scores of several
seeds (one row per seed) get the hierarchical bootstrap
(:func:`moealign.evaluation.stats.hierarchical_bootstrap_means`): each replicate draws the seeds
with replacement (the same draw for every task, a seed being one run), then the examples of
each task — per drawn seed (nested), or once for all seeds when they answered the same examples
(crossed) — so that the interval holds the seed-to-seed variance as well as the
example-sampling one.

CTGI is reported beside the plain held-out accuracy gain ΔA = mean_t (A_m(t) − A_b(t)) over
every held-out task, with its paired interval from the same resamples. With h_t = U(t) − A_b(t),
CTGI = (1/n) Σ_t ΔA_t / h_t: task t's accuracy change carries the share w_t = (1/h_t) / Σ_t'
(1/h_t') of CTGI's weight, against 1/n in ΔA, so tasks with little headroom dominate (one
question more on a task with 3 questions of headroom counts as much as ten more on one with 30).
``small_headroom_share`` = Σ w_t over the included tasks with h_t < ``small_headroom`` (10
points by default); when it is over one half, ``warning`` says so.

Companion scalar: transfer ratio TR_m = mean held-out gain (A_m − A_b) / mean in-domain gain.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from moealign.evaluation.stats import (
    hierarchical_bootstrap_means,
    percentile_interval,
    seed_bootstrap_indices,
)
from moealign.evaluation.verdicts import Comparison, bootstrap_comparison

# Above this share of CTGI's weight on small-headroom tasks, CTGI carries a warning.
SMALL_HEADROOM_SHARE_WARNING = 0.5


@dataclass(frozen=True)
class CTGIEstimate:
    """CTGI point estimate beside the plain accuracy gain (module docstring).

    ``per_task_gain``: G_m(t) of the included tasks; ``excluded_tasks``: task → headroom
    U(t) − A_b(t) for the tasks left out because the headroom is below ``min_headroom``;
    ``accuracy_gain``: mean over every task of A_m(t) − A_b(t); ``headroom``: h_t of the
    included tasks; ``small_headroom_share``: the share of CTGI's weight on included tasks with
    h_t < ``small_headroom``.
    """

    value: float
    per_task_gain: dict[str, float]
    excluded_tasks: dict[str, float]
    accuracy_gain: float
    headroom: dict[str, float]
    small_headroom: float
    small_headroom_share: float

    @property
    def small_headroom_tasks(self) -> list[str]:
        return sorted(t for t, h in self.headroom.items() if _below(h, self.small_headroom))

    @property
    def warning(self) -> str | None:
        """A warning when small-headroom tasks carry over half of CTGI's weight, else None."""
        if self.small_headroom_share <= SMALL_HEADROOM_SHARE_WARNING:
            return None
        return (
            f"tasks with headroom under {self.small_headroom:g} "
            f"({', '.join(self.small_headroom_tasks)}) carry {self.small_headroom_share:.0%} of "
            "the CTGI weight: it amplifies their accuracy changes; read it with the plain gain"
        )


@dataclass(frozen=True)
class CTGIResult(CTGIEstimate):
    """CTGI with its paired bootstrap percentile interval [ci_low, ci_high], and the plain
    accuracy gain's [gain_ci_low, gain_ci_high] from the same resamples; ``comparison`` and
    ``gain_comparison`` are their verdicts against 0 (percentile-bootstrap p-values, TOST
    within ±``margin``; :func:`moealign.evaluation.verdicts.bootstrap_comparison`)."""

    ci_low: float
    ci_high: float
    confidence: float
    gain_ci_low: float
    gain_ci_high: float
    comparison: Comparison
    gain_comparison: Comparison


def normalized_gain(
    model_accuracy: float | np.ndarray,
    baseline_accuracy: float | np.ndarray,
    upper_bound: float | np.ndarray,
) -> float | np.ndarray:
    """G = (A_m − A_b) / (U − A_b), elementwise. DESIGN.md §7."""
    return (model_accuracy - baseline_accuracy) / (upper_bound - baseline_accuracy)


def _below(headroom: float, threshold: float) -> bool:
    # isclose counts a headroom of exactly the threshold (e.g. 0.03 − 0.02 = 0.00999...) as
    # not below it.
    return headroom < threshold and not math.isclose(headroom, threshold)


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
    small_headroom: float = 0.10,
) -> CTGIEstimate:
    """CTGI from per-task accuracies (no interval), e.g. for published tables.

    ``upper_bound``, ``min_headroom``, ``small_headroom`` and the accuracies share one unit
    (fractions or percent: pass ``small_headroom=10.0`` with percentages); ``upper_bound`` is
    one value for all tasks or a per-task mapping (oracle accuracies).
    """
    tasks = _check_same_tasks(model_accuracy, baseline_accuracy, upper_bound)
    per_task_gain: dict[str, float] = {}
    excluded_tasks: dict[str, float] = {}
    included_headroom: dict[str, float] = {}
    for task in tasks:
        upper = float(_task_upper_bound(upper_bound, task))
        headroom = upper - float(baseline_accuracy[task])
        if _below(headroom, min_headroom):
            excluded_tasks[task] = headroom
        else:
            included_headroom[task] = headroom
            per_task_gain[task] = float(
                normalized_gain(float(model_accuracy[task]), float(baseline_accuracy[task]), upper)
            )
    if not per_task_gain:
        raise ValueError(
            f"every task has headroom U − A_b below min_headroom={min_headroom}: {excluded_tasks}"
        )
    inverse = {task: 1.0 / h for task, h in included_headroom.items()}
    small = sum(w for t, w in inverse.items() if _below(included_headroom[t], small_headroom))
    return CTGIEstimate(
        value=float(np.mean(list(per_task_gain.values()))),
        per_task_gain=per_task_gain,
        excluded_tasks=excluded_tasks,
        accuracy_gain=float(
            np.mean([float(model_accuracy[t]) - float(baseline_accuracy[t]) for t in tasks])
        ),
        headroom=included_headroom,
        small_headroom=small_headroom,
        small_headroom_share=small / sum(inverse.values()),
    )


def _per_example(values: Sequence[float] | np.ndarray, name: str, task: str) -> np.ndarray:
    """Per-example scores as (S, N): one row per seed (a 1-D array is one seed)."""
    values_SN = np.asarray(values, dtype=np.float64)
    if values_SN.ndim == 1:
        values_SN = values_SN[None]
    if values_SN.ndim != 2 or values_SN.size == 0:
        raise ValueError(
            f"{name}[{task!r}] must be a non-empty array of per-example scores, 1-D (examples) "
            f"or 2-D (seeds × examples), got shape {np.shape(values)}"
        )
    return values_SN


def ctgi(
    per_task_model: Mapping[str, Sequence[float] | np.ndarray],
    per_task_baseline: Mapping[str, Sequence[float] | np.ndarray],
    upper_bound: float | Mapping[str, Sequence[float] | np.ndarray | float] = 1.0,
    min_headroom: float = 0.01,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    small_headroom: float = 0.10,
    shared_examples: bool = False,
    margin: float = 0.01,
) -> CTGIResult:
    """CTGI over held-out tasks with a paired bootstrap interval. DESIGN.md §7.

    ``per_task_model[t]`` and ``per_task_baseline[t]`` hold per-example correctness (0/1, or
    scores) on the same examples of task t: 1-D (examples), or 2-D (seeds × examples, the
    same seeds, in the same order, for every task); A(t) is their mean. With several seeds the
    interval is the hierarchical bootstrap of the module docstring, crossed when
    ``shared_examples`` (every seed answered the same examples of a task), else nested.
    ``upper_bound`` is a constant
    (1.0 = 100% for 0/1 correctness), or per task either a constant or the oracle's per-example
    correctness on the same examples. Tasks with U(t) − A_b(t) < ``min_headroom`` (same units as
    the accuracies; 0.01 = 1 point) on the full data are excluded and listed in
    ``excluded_tasks``. ``small_headroom`` (same units; 0.10 = 10 points) sets the warning of
    the module docstring. ``margin`` is the equivalence margin of the verdicts (same units:
    0.01 = 1 point of accuracy, and 0.01 of CTGI).

    Bootstrap: for each of ``n_resamples`` replicates draw the seeds (with several), then for
    each task that task's examples with replacement, apply the same indices to model, baseline
    and an oracle upper bound, recompute the accuracies, CTGI (included tasks) and the plain
    gain (every task); the intervals are the percentile intervals of the replicates. If a
    replicate leaves a task with zero headroom the gain is inf/nan and so may the interval be:
    raise ``min_headroom`` or use more examples.
    """
    if n_resamples <= 0:
        raise ValueError(f"n_resamples must be a positive number of replicates, got {n_resamples}")
    tasks = _check_same_tasks(per_task_model, per_task_baseline, upper_bound)
    scores_by_task: dict[str, np.ndarray] = {}  # model, baseline[, oracle]; (K, seeds, N)
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
        if len({row.shape for row in rows}) != 1:
            raise ValueError(
                f"task {task!r}: model, baseline and upper bound must score the same examples "
                f"(and seeds), got shapes {[row.shape for row in rows]}"
            )
        scores_by_task[task] = np.stack(rows)
    n_seeds = {scores_KSN.shape[1] for scores_KSN in scores_by_task.values()}
    if len(n_seeds) != 1:
        raise ValueError(f"every task must have the same number of seeds (rows), got {n_seeds}")

    def upper_accuracy(task: str, accuracy_RS: np.ndarray) -> np.ndarray:
        return upper_constant[task] if task in upper_constant else accuracy_RS[..., 2]

    accuracy_by_task = {
        task: scores_KSN.mean(axis=(1, 2)) for task, scores_KSN in scores_by_task.items()
    }
    estimate = ctgi_from_accuracies(
        {task: acc_S[0] for task, acc_S in accuracy_by_task.items()},
        {task: acc_S[1] for task, acc_S in accuracy_by_task.items()},
        upper_bound={task: upper_accuracy(task, acc_S) for task, acc_S in accuracy_by_task.items()},
        min_headroom=min_headroom,
        small_headroom=small_headroom,
    )

    rng = np.random.default_rng(seed)
    seeds_RS = seed_bootstrap_indices(n_seeds.pop(), n_resamples, rng)
    normalized_sum_R = np.zeros(n_resamples)
    accuracy_gain_sum_R = np.zeros(n_resamples)
    for task in tasks:
        accuracy_RS = hierarchical_bootstrap_means(
            scores_by_task[task], seeds_RS, rng, shared_examples
        )
        accuracy_gain_sum_R += accuracy_RS[:, 0] - accuracy_RS[:, 1]
        if task not in estimate.per_task_gain:
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            normalized_sum_R += normalized_gain(
                accuracy_RS[:, 0], accuracy_RS[:, 1], upper_accuracy(task, accuracy_RS)
            )
    ctgi_R = normalized_sum_R / len(estimate.per_task_gain)
    gain_R = accuracy_gain_sum_R / len(tasks)
    ci_low, ci_high = percentile_interval(ctgi_R, confidence)
    gain_ci_low, gain_ci_high = percentile_interval(gain_R, confidence)
    seeds = seeds_RS.shape[1]
    return CTGIResult(
        **vars(estimate),
        ci_low=ci_low,
        ci_high=ci_high,
        confidence=confidence,
        gain_ci_low=gain_ci_low,
        gain_ci_high=gain_ci_high,
        comparison=bootstrap_comparison(estimate.value, ctgi_R, margin, 1 - confidence, seeds),
        gain_comparison=bootstrap_comparison(
            estimate.accuracy_gain, gain_R, margin, 1 - confidence, seeds
        ),
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
