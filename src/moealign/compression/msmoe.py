"""M-SMoE expert merging (Li et al., ICLR 2024, arXiv 2310.01334; research-compression.md §2).

Per layer, to E′ experts:

1. Dominant experts: the E′ most frequently routed on the calibration tokens (f_e; ties to the
   lower index).
2. Every other expert joins the dominant expert d of greatest router-logit similarity
   s_ed = (cos(H[:, e], H[:, d]) + 1) / 2, H the (T, E) calibration logits (ties to the lower d).
3. In each group, every member's hidden units are permuted to match the dominant expert's
   (:mod:`moealign.compression.permutation`).
4. The group becomes one expert W_G = Σ_{e∈G} f_e W_e / Σ_{e∈G} f_e, for gate, up and down each
   (uniform weights if no member was routed); a group of one is the expert unchanged.

Router: R3 (:mod:`moealign.compression.plan`; the MC-SMoE code keeps all rows, R2). Deviations
from the source: E′ is the same in every layer (M-SMoE's "globally_group" spreads a global
budget over layers by frequency; a moealign or transformers config has one expert count for
all layers); no MC step (LoSparse low-rank + sparse compression and distillation).
"""

from __future__ import annotations

from torch import Tensor

from moealign.compression.calibration import LayerCalibration
from moealign.compression.layers import ExpertWeights
from moealign.compression.permutation import align_to
from moealign.compression.plan import (
    LayerPlan,
    merge_coefficients,
    sorted_groups,
    stack_experts,
    weighted_sum,
)


def msmoe_groups(calibration: LayerCalibration, keep_experts: int) -> dict[int, list[int]]:
    """{dominant expert: its group's members (ascending, the dominant included)}."""
    counts = calibration.counts.tolist()
    n_experts = len(counts)
    by_frequency = sorted(range(n_experts), key=lambda e: (-counts[e], e))
    dominants = sorted(by_frequency[:keep_experts])
    similarity_EE = (calibration.logit_similarity + 1) / 2
    groups = {d: [d] for d in dominants}
    for e in range(n_experts):
        if e not in groups:
            nearest = max(dominants, key=lambda d: (float(similarity_EE[e, d]), -d))
            groups[nearest].append(e)
    return {d: sorted(members) for d, members in groups.items()}


def merge_group(
    weights: ExpertWeights, dominant: int, members: list[int], coefficients: Tensor
) -> ExpertWeights:
    """Σ f̂_e W_e over ``members`` (ascending), each aligned to the ``dominant`` expert first."""
    reference = weights.expert(dominant)
    aligned = [
        reference if e == dominant else align_to(reference, weights.expert(e)) for e in members
    ]
    return ExpertWeights(
        *(weighted_sum(parts, coefficients) for parts in zip(*aligned, strict=True))
    )


def msmoe_plan(calibration: LayerCalibration, keep_experts: int) -> LayerPlan:
    """The M-SMoE plan of one layer (module docstring)."""
    weights = ExpertWeights(*(w.detach() for w in calibration.view.weights))
    frequencies = calibration.frequencies
    dominant_of = {
        tuple(members): d for d, members in msmoe_groups(calibration, keep_experts).items()
    }
    groups = sorted_groups(dominant_of)
    coefficients = [merge_coefficients(frequencies, group) for group in groups]
    merged = [
        weights.expert(group[0])
        if len(group) == 1
        else merge_group(weights, dominant_of[group], list(group), weights_g)
        for group, weights_g in zip(groups, coefficients, strict=True)
    ]
    return LayerPlan(
        groups=groups,
        member_weights=coefficients,
        experts=stack_experts(merged),
    )
