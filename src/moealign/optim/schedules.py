"""Learning-rate and λ schedules (DESIGN.md §1 ``schedules.py``, §4).

The learning rate at optimizer step t (0-based) is lr_base · m(t) with

    m(t) = (t + 1) / W                                         for t < W (linear warm-up)
    m(t) = r + (1 − r) · ½ (1 + cos(π · min(1, (t − W) / max(1, N − W))))   (cosine)
    m(t) = 1                                                   after warm-up (constant)

W = ``warmup_steps``, N = ``total_steps``, r = ``min_lr_ratio``. Used through
``torch.optim.lr_scheduler.LambdaLR``, whose ``last_epoch`` counts the optimizer steps taken.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["LAMBDA_SCHEDULES", "LambdaSchedule", "WarmupCosine"]


@dataclass(frozen=True)
class WarmupCosine:
    """Learning-rate multiplier m(t): linear warm-up, then cosine decay to ``min_lr_ratio``
    (``schedule="cosine"``) or a constant 1 (``schedule="constant"``)."""

    warmup_steps: int
    total_steps: int
    min_lr_ratio: float = 0.0
    schedule: str = "cosine"

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule: got {self.schedule!r}; expected 'cosine' or 'constant'")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio: got {self.min_lr_ratio!r}; expected in [0, 1]")
        if self.warmup_steps < 0 or self.total_steps < 1:
            raise ValueError(
                f"warmup_steps/total_steps: got {self.warmup_steps}/{self.total_steps}; "
                "expected warmup_steps >= 0 and total_steps >= 1"
            )

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        progress = min(
            1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        )
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (
            1.0 + math.cos(math.pi * progress)
        )


LAMBDA_SCHEDULES = ("none", "fixed", "warmup", "warmup_anneal")


@dataclass(frozen=True)
class LambdaSchedule:
    """Weight λ(t) of the routing alignment loss (DESIGN.md §4; the guide's Steps 2–3).

    * ``none``: λ = 0 (the baseline without L_align);
    * ``fixed``: λ = λ_target from the first step;
    * ``warmup``: λ(t) = λ_target · min(1, t / N_warm);
    * ``warmup_anneal``: the warm-up, then held until ``anneal_start``, then linear to
      λ_final over ``anneal_steps`` steps and constant after.

    ``t`` may be fractional (the guardrails slow the warm-up by evaluating λ at t / s).
    """

    kind: str = "warmup"
    target: float = 0.1
    warmup_steps: int = 0
    final: float = 0.0
    anneal_start: int = 0
    anneal_steps: int = 0

    def __post_init__(self) -> None:
        if self.kind not in LAMBDA_SCHEDULES:
            raise ValueError(
                f"alignment.schedule={self.kind!r} is not accepted; "
                f"choose one of {LAMBDA_SCHEDULES}"
            )
        if self.target < 0 or self.final < 0:
            raise ValueError(
                f"alignment.lambda_target={self.target!r}/lambda_final={self.final!r} are not "
                "accepted; expected values >= 0"
            )
        if self.warmup_steps < 0 or self.anneal_steps < 0 or self.anneal_start < 0:
            raise ValueError(
                "alignment.warmup_steps/anneal_start/anneal_steps must be >= 0; got "
                f"{self.warmup_steps}/{self.anneal_start}/{self.anneal_steps}"
            )
        if self.kind == "warmup_anneal" and self.anneal_start < self.warmup_steps:
            raise ValueError(
                f"alignment.anneal_start={self.anneal_start} is not accepted; expected >= "
                f"warmup_steps={self.warmup_steps}"
            )

    def __call__(self, step: float) -> float:
        if self.kind == "none":
            return 0.0
        if self.kind == "fixed":
            return self.target
        lam = self.target * min(1.0, step / self.warmup_steps) if self.warmup_steps else self.target
        if self.kind == "warmup_anneal" and step >= self.anneal_start:
            progress = min(1.0, (step - self.anneal_start) / max(1, self.anneal_steps))
            lam = self.target + (self.final - self.target) * progress
        return lam
