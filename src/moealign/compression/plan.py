"""A layer's compression plan: which original experts stand behind each new expert, the new
expert weights, and the router update that keeps routing consistent with them.

Router update (research-compression.md §0):

* **R1 slice** (pruning): a kept expert keeps its router row; dropped rows go. Equivalent to
  setting the dropped logits to −∞ before the softmax; top-k is unchanged (K ≤ E′).
* **R2 share** (merging, moealign models; the MC-SMoE, HC-SMoE and REAP code): all E router
  rows stay and row e sends its gate to its group's merged expert, expert_map[e] = g for
  e ∈ G (:class:`moealign.nn.moe.MoELayer`'s ``merged_experts``). The routing decisions are
  the original model's; a token whose top-k rows fall in one group gets that group's expert
  with their summed weight.
* **R3 collapse** (merging, transformers models only): one row per group, the
  frequency-weighted mean of its members' rows, r_G = Σ_{e∈G} f̂_e r_e with
  f̂_e = f_e / Σ_{j∈G} f_j (uniform when no member was routed), as the Sub-MoE reproduction
  (zhy617) does. Used only where the target format demands it: a transformers MoE config has
  one router row per expert and no expert→group map. It changes the routing decisions (a
  token whose two choices fall in one group gets that group and the next best one), so it
  loses more than R2. A group of one is R1.
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

    @property
    def merges(self) -> bool:
        """Whether some new expert stands for more than one original expert."""
        return any(len(group) > 1 for group in self.groups)

    def expert_map(self, n_experts: int) -> Tensor:
        """R2's map (E,) int64: original expert e → its group's new expert g."""
        mapping = torch.full((n_experts,), -1, dtype=torch.long)
        for g, group in enumerate(self.groups):
            mapping[list(group)] = g
        if (mapping < 0).any():
            raise ValueError("an R2 map needs every original expert in a group")
        return mapping

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
