"""Permutation alignment of SwiGLU hidden units before merging (M-SMoE weight matching,
research-compression.md §2.1, the SwiGLU form of REAP's "wm").

An expert's F hidden units can be permuted without changing its function:
gate ← gate[π], up ← up[π], down ← down[:, π]. To merge expert e into a reference expert
(the group's dominant one), find the π that matches e's units to the reference's,

    π = argmin_π Σ_a ‖gate_ref[a] − gate_e[π_a]‖² + ‖up_ref[a] − up_e[π_a]‖²
                    + ‖down_ref[:, a] − down_e[:, π_a]‖²,

a linear assignment problem solved exactly by ``scipy.optimize.linear_sum_assignment``.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from moealign.compression.layers import ExpertWeights


def _unit_features(expert: ExpertWeights) -> Tensor:
    """(F, 3D) per hidden unit: its gate row, up row and down column, float64."""
    gate_FD, up_FD, down_DF = (w.double() for w in expert)
    return torch.cat([gate_FD, up_FD, down_DF.T], dim=1)


def match_hidden_units(reference: ExpertWeights, expert: ExpertWeights) -> Tensor:
    """π (F,) long: unit a of the aligned expert is unit π[a] of ``expert`` (matrices as
    (F, D), (F, D), (D, F))."""
    cost_FF = torch.cdist(_unit_features(reference), _unit_features(expert)).square()
    rows, columns = linear_sum_assignment(cost_FF.cpu().numpy())
    permutation = torch.empty(len(rows), dtype=torch.long)
    permutation[torch.as_tensor(rows)] = torch.as_tensor(columns, dtype=torch.long)
    return permutation.to(reference.gate.device)


def permute_hidden_units(expert: ExpertWeights, permutation: Tensor) -> ExpertWeights:
    """The same function with its hidden units reordered: gate[π], up[π], down[:, π]."""
    return ExpertWeights(
        expert.gate[permutation], expert.up[permutation], expert.down[:, permutation]
    )


def align_to(reference: ExpertWeights, expert: ExpertWeights) -> ExpertWeights:
    """``expert`` with its hidden units permuted to match ``reference``'s."""
    return permute_hidden_units(expert, match_hidden_units(reference, expert))
