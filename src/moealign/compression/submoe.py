"""Sub-MoE expert merging (arXiv 2506.23266; research-compression.md §1, §7).

Per layer, to E′ experts:

1. **Adaptive expert clustering**: K-means (k-means++, 10 initialisations, seeded) with E′
   clusters on the rows of 1 − Sim, Sim(i, j) = mean_t cos(E_i(x_t), E_j(x_t)) the per-token
   output cosine on the calibration tokens (the zhy617 reproduction's transcription, §1.1–2).
2. **Experts union decomposition**: for each cluster G and each of gate, up and down
   separately, the members' matrices in nn.Linear layout W_e (d_out × d_in) are concatenated
   along the input axis, C = [W_e1, …, W_en] (d_out × n·d_in), and decomposed C = U Σ Vᵀ
   (thin SVD, float64); U is shared and B_e = Vᵀ[:, j·d_in:(j+1)·d_in] is expert e's block.
3. **Merge V**: B̄ = Σ_{e∈G} f̂_e B_e with f̂_e = f_e / Σ_{j∈G} f_j (uniform if none routed).
4. **Reconstruct**: W_G = U_k Σ_k B̄_k with the top-k singular triplets (the truncated SVD
   stage). At full rank W_e = U Σ B_e exactly, so W_G = Σ f̂_e W_e (§1.6): a
   frequency-weighted average of the cluster, no SVD stage left; at rank k,
   W_G = U_k U_kᵀ Σ f̂_e W_e, the average projected on the cluster's top-k shared subspace.
   ``rank=None`` (the default) takes k = ⌊d_out·d_in / (d_out + d_in)⌋ per matrix, the
   largest k at which the factors U_kΣ_k (d_out × k) and B̄_k (k × d_in) hold no more numbers
   than W_G itself (the paper does not publish its k; both reproductions keep full rank). A
   rank at or above a matrix's own rank keeps it whole (the frequency-weighted average). W_G
   is stored reconstructed (dense), so the rank changes the merged weights but not the
   parameter count.

A cluster of one is not merged: the expert is kept unchanged. Router: R2 on moealign models,
R3 on transformers models (:mod:`moealign.compression.plan`; the paper's router update is not
published, zhy617 uses R3, REAP R2).
Deviations: E′ is the same in every layer (the paper shares a budget over adjacent layers by
a "diversity" rule it does not give, §1.2); no hidden-unit alignment before the SVD (the
paper's stance is not published); no whitening; no intra-expert compression.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from moealign.compression.calibration import LayerCalibration
from moealign.compression.layers import ExpertWeights
from moealign.compression.plan import LayerPlan, merge_coefficients, sorted_groups, stack_experts

KMEANS_INITIALISATIONS = 10


def output_clusters(
    calibration: LayerCalibration, keep_experts: int, seed: int = 0
) -> list[tuple[int, ...]]:
    """E′ clusters of the experts by K-means on the rows of 1 − Sim (sorted groups).

    K-means can leave fewer than E′ distinct clusters when experts have identical similarity
    rows; then the largest cluster gives up its highest-index member as a cluster of its own
    until there are E′ (so the layer keeps E′ experts)."""
    n_experts = calibration.view.n_experts
    if keep_experts == n_experts:
        return [(e,) for e in range(n_experts)]
    from sklearn.cluster import KMeans  # imported only for Sub-MoE (slow to import)

    features = (1.0 - calibration.output_similarity).numpy()
    kmeans = KMeans(
        n_clusters=keep_experts, init="k-means++", n_init=KMEANS_INITIALISATIONS, random_state=seed
    )
    labels = kmeans.fit(features).labels_
    groups = [list(np.flatnonzero(labels == c)) for c in range(keep_experts)]
    groups = [g for g in groups if g]
    while len(groups) < keep_experts:
        largest = max(groups, key=lambda g: (len(g), -min(g)))
        groups.append([largest.pop(largest.index(max(largest)))])
    return sorted_groups(groups)


def joint_svd(matrices: Sequence[Tensor]) -> tuple[Tensor, Tensor, list[Tensor]]:
    """U (d_out × r), Σ (r,) and each matrix's block B_e (r × d_in) of the thin SVD of
    C = [W_1, …, W_n] concatenated along the input axis (float64): W_e = U diag(Σ) B_e."""
    concatenated = torch.cat([m.double() for m in matrices], dim=1)
    u, s, vh = torch.linalg.svd(concatenated, full_matrices=False)
    return u, s, list(vh.split(matrices[0].shape[1], dim=1))


def default_rank(d_out: int, d_in: int) -> int:
    """⌊d_out·d_in / (d_out + d_in)⌋: the largest rank whose factors are no larger than the
    dense d_out × d_in matrix (module docstring)."""
    return max(1, d_out * d_in // (d_out + d_in))


def subspace_merge(
    matrices: Sequence[Tensor], coefficients: Tensor, rank: int | None = None
) -> Tensor:
    """W_G = U_k diag(Σ_k) Σ_e c_e B_e[:k] (module docstring), in the matrices' dtype; ``rank``
    None = :func:`default_rank`."""
    u, s, blocks = joint_svd(matrices)
    if rank is None:
        rank = default_rank(*matrices[0].shape)
    k = min(rank, len(s))
    merged_block = sum(c * b[:k] for c, b in zip(coefficients.tolist(), blocks, strict=True))
    return ((u[:, :k] * s[:k]) @ merged_block).to(matrices[0].dtype)


def submoe_plan(
    calibration: LayerCalibration, keep_experts: int, seed: int = 0, rank: int | None = None
) -> LayerPlan:
    """The Sub-MoE plan of one layer (module docstring)."""
    weights = ExpertWeights(*(w.detach() for w in calibration.view.weights))
    groups = output_clusters(calibration, keep_experts, seed)
    coefficients = [merge_coefficients(calibration.frequencies, group) for group in groups]
    merged = []
    for group, coefficients_g in zip(groups, coefficients, strict=True):
        if len(group) == 1:
            merged.append(weights.expert(group[0]))
            continue
        members = [weights.expert(e) for e in group]
        merged.append(
            ExpertWeights(
                *(
                    subspace_merge(parts, coefficients_g, rank)
                    for parts in zip(*members, strict=True)
                )
            )
        )
    return LayerPlan(groups=groups, member_weights=coefficients, experts=stack_experts(merged))
