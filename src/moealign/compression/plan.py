"""A layer's compression plan: which original experts stand behind each new expert, the new
expert weights, and the router update that keeps routing consistent with them.

Router update (research-compression.md §0):

* **R1 slice** (pruning): a kept expert keeps its router row; dropped rows go. Equivalent to
  setting the dropped logits to −∞ before the softmax; top-k is unchanged (K ≤ E′).
* **R3 collapse** (merging): one row per group, the frequency-weighted mean of its members'
  rows, r_G = Σ_{e∈G} f̂_e r_e with f̂_e = f_e / Σ_{j∈G} f_j (uniform when no member was
  routed). A group of one is R1.

Why R3 and not R2 for merging: R2 (keep all E rows and route a member's gate to its group)
is what the MC-SMoE, HC-SMoE and REAP code do, but no transformers MoE class can express an
expert→group map, so an R2 model could neither be saved as a plain E′-expert checkpoint nor
reloaded by transformers; R3 is what the Sub-MoE reproduction (zhy617) does and leaves an
ordinary E′-expert model that trains, evaluates, resumes and exports like any other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from moealign.compression.layers import ExpertWeights


@dataclass
class LayerPlan:
    """``groups[g]``: the original experts behind new expert g (one for a kept expert);
    ``member_weights[g]``: their f̂ (float64, summing to 1), which collapse the router rows;
    ``experts``: the E′ new experts."""

    groups: list[tuple[int, ...]]
    member_weights: list[Tensor]
    experts: ExpertWeights

    @property
    def n_experts(self) -> int:
        return len(self.groups)

    def collapse_rows(self, rows_E: Tensor) -> Tensor:
        """Per-expert rows (E, ...) of the router (weights, expert bias) → (E′, ...): R1 for a
        kept expert (its row, bit for bit), R3 for a group (Σ f̂_e r_e in float64)."""
        new_rows = []
        for group, weights in zip(self.groups, self.member_weights, strict=True):
            if len(group) == 1:
                new_rows.append(rows_E[group[0]])
                continue
            members = rows_E[list(group)].double()
            coefficients = weights.to(members.device).view(-1, *[1] * (members.dim() - 1))
            new_rows.append((coefficients * members).sum(0).to(rows_E.dtype))
        return torch.stack(new_rows)


def merge_coefficients(frequencies_E: Tensor, group: Sequence[int]) -> Tensor:
    """f̂_e = f_e / Σ_{j∈G} f_j for e in ``group`` (float64); uniform when Σ f = 0."""
    f = frequencies_E.double()[list(group)]
    total = f.sum()
    return f / total if total > 0 else torch.full_like(f, 1.0 / len(group))


def prune_plan(weights: ExpertWeights, keep: Sequence[int]) -> LayerPlan:
    """Keep the experts ``keep`` (in ascending order), drop the rest (R1)."""
    keep = sorted(int(e) for e in keep)
    index = torch.tensor(keep, dtype=torch.long, device=weights.gate.device)
    return LayerPlan(
        groups=[(e,) for e in keep],
        member_weights=[torch.ones(1, dtype=torch.float64) for _ in keep],
        experts=ExpertWeights(*(w.detach().index_select(0, index) for w in weights)),
    )


def weighted_sum(matrices: Sequence[Tensor], coefficients: Tensor) -> Tensor:
    """Σ_i c_i M_i in float64, returned in the matrices' dtype."""
    total = sum(c * m.double() for c, m in zip(coefficients.tolist(), matrices, strict=True))
    return total.to(matrices[0].dtype)


def stack_experts(experts: Sequence[ExpertWeights]) -> ExpertWeights:
    """Single experts ((F, D), (F, D), (D, F) each) stacked into (E′, ...) tensors."""
    return ExpertWeights(*(torch.stack(parts) for parts in zip(*experts, strict=True)))


def sorted_groups(groups: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """Groups with their members ascending, ordered by their smallest member (the order of the
    new experts)."""
    return sorted((tuple(sorted(int(e) for e in g)) for g in groups if len(g)), key=min)
