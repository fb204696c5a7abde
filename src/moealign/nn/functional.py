"""Numerically safe elementwise functions shared by losses and diagnostics."""

from __future__ import annotations

import torch
from torch import Tensor


def plogp(p: Tensor) -> Tensor:
    """p · log p elementwise with 0 · log 0 = 0 and a finite gradient at p = 0 (DESIGN.md §4).

    ``torch.special.xlogy(p, p)`` has the right value at 0 but a NaN gradient there (0/0), and
    float32 softmax probabilities are exactly 0 once a logit trails the largest by ≥ 104. Here
    the log reads p clamped at the dtype's smallest normal number, and ``torch.where`` sends no
    gradient through the unused branch, so ∂/∂p = log p + 1 for p > 0 and 0 at p = 0 (through a
    softmax, where ∂p/∂logit = 0 at p = 0, this is the float64 gradient to rounding).
    """
    tiny = torch.finfo(p.dtype).tiny
    return torch.where(p > 0, p * torch.log(p.clamp_min(tiny)), 0.0)
