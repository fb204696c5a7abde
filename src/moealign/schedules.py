"""Learning-rate schedules (DESIGN.md §1 ``schedules.py``).

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

__all__ = ["WarmupCosine"]


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
