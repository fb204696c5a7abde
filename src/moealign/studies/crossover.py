"""When one model overtakes another: where two validation-loss curves cross, and how many tokens
each expert of a mixture of experts has seen against a dense FFN.

An MoE with E experts, K per token, starts behind a dense model of the same *active* size: each
expert is trained on only K/E of the token slots while the dense FFN sees every token, and the
MoE has E/K times the FFN parameters to fill. Given enough tokens its larger capacity wins, so
which of the two ranks first depends on the training budget (the demo reports both).

**Crossing step.** With d_i = model_i − baseline_i the difference of the (seed-mean) validation
losses at the evaluated steps s_1 < … < s_n (step 0, the models as initialised, left out: their
difference is noise), the model overtakes the baseline for good after the last evaluation
s_i with d_i ≥ 0, and the crossing step is the root of the straight line between (s_i, d_i) and
(s_{i+1}, d_{i+1}):

    s* = s_i + (s_{i+1} − s_i) · d_i / (d_i − d_{i+1}).

There is no crossing within the budget when d_n ≥ 0 (the model is not ahead at the last
evaluation), and none to report when d_i < 0 at every evaluation (ahead from the first one).

**Tokens per expert.** Dropless top-K routing sends each token to K of E experts, so over T
tokens an expert receives T·K/E token slots on average, a dense FFN all T.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from moealign.studies.results import RunRecord

__all__ = ["Crossing", "crossing", "curve_crossings", "format_tokens", "tokens_per_expert"]

Outcome = Literal["crossed", "not_crossed", "ahead_throughout"]


@dataclass(frozen=True)
class Crossing:
    """Where ``model`` overtakes ``baseline`` for good: ``step`` (interpolated) when
    ``outcome == "crossed"``, else None; ``first_step``/``last_step``: the evaluated range."""

    outcome: Outcome
    step: float | None
    first_step: int
    last_step: int

    def text(self, tokens_per_step: int) -> str:
        """E.g. "step 612 (1.25M tokens)", "no crossing within the budget (700 steps)"."""
        if self.step is not None:  # outcome "crossed"
            tokens = format_tokens(self.step * tokens_per_step)
            return f"step {self.step:.0f} ({tokens} tokens)"
        if self.outcome == "ahead_throughout":
            return f"ahead at every evaluation from step {self.first_step}"
        return f"no crossing within the budget ({self.last_step} steps)"


def crossing(
    steps: Sequence[int], model: Sequence[float], baseline: Sequence[float]
) -> Crossing | None:
    """The step where ``model``'s loss curve falls below ``baseline``'s for good (module
    docstring); None when no evaluation after step 0 has both values."""
    points = [
        (int(s), float(a) - float(b))
        for s, a, b in zip(steps, model, baseline, strict=True)
        if s > 0 and math.isfinite(a) and math.isfinite(b)
    ]
    if not points:
        return None
    points.sort()
    first, last = points[0][0], points[-1][0]
    if points[-1][1] >= 0:
        return Crossing("not_crossed", None, first, last)
    behind = [i for i, (_, d) in enumerate(points) if d >= 0]
    if not behind:
        return Crossing("ahead_throughout", None, first, last)
    (s_i, d_i), (s_next, d_next) = points[behind[-1]], points[behind[-1] + 1]
    step = s_i + (s_next - s_i) * d_i / (d_i - d_next)
    return Crossing("crossed", step, first, last)


def curve_crossings(
    model_runs: Sequence[RunRecord],
    baseline_runs: Sequence[RunRecord],
    key: str = "val_loss",
) -> tuple[Crossing | None, dict[int, Crossing | None]]:
    """The crossing of the seed-mean ``key`` curves (validation split) of two variants, over
    the seeds both have and the steps all their runs logged, and each seed's own crossing."""
    ours = {run.seed: _val_curve(run, key) for run in model_runs}
    theirs = {run.seed: _val_curve(run, key) for run in baseline_runs}
    seeds = sorted(seed for seed in ours.keys() & theirs.keys() if ours[seed] and theirs[seed])
    if not seeds:
        return None, {}
    per_seed = {seed: crossing(*_paired(ours[seed], theirs[seed])) for seed in seeds}
    common = set.intersection(*(set(ours[s]) & set(theirs[s]) for s in seeds))
    steps = sorted(common)
    mean_ours = [float(np.mean([ours[s][step] for s in seeds])) for step in steps]
    mean_theirs = [float(np.mean([theirs[s][step] for s in seeds])) for step in steps]
    return crossing(steps, mean_ours, mean_theirs), per_seed


def _val_curve(run: RunRecord, key: str) -> dict[int, float]:
    """{step: value} of ``key`` in the run's validation records (finite values only)."""
    from moealign.studies.plots import seed_curve

    curve = seed_curve([run], key, "val")
    if curve is None:
        return {}
    steps, values = curve
    return dict(zip(steps.tolist(), values[0].tolist(), strict=True))


def _paired(
    ours: dict[int, float], theirs: dict[int, float]
) -> tuple[list[int], list[float], list[float]]:
    """The steps both curves hold, with both curves' values there."""
    common = sorted(ours.keys() & theirs.keys())
    return common, [ours[s] for s in common], [theirs[s] for s in common]


def tokens_per_expert(tokens: float, top_k: int, n_experts: int) -> float:
    """Token slots one expert receives on average from ``tokens`` tokens: T·K/E."""
    return tokens * top_k / n_experts


def format_tokens(tokens: float) -> str:
    """A token count for reading: 1.25M, 179k, 640."""
    if tokens >= 1e6:
        return f"{tokens / 1e6:.2f}M"
    if tokens >= 1e3:
        return f"{tokens / 1e3:.0f}k"
    return f"{tokens:.0f}"
