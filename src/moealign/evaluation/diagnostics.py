"""Routing diagnostics (DESIGN.md §3 and §4): load balance, utilisation, entropy, alignment.

``counts`` arguments are expert loads: shape (E,) for one layer or (L, E) for L layers; layer
statistics are computed per layer (the last dimension) and returned per layer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moealign.nn.functional import plogp
from moealign.nn.moe import MoELayer
from moealign.nn.routers import MPIRouter


def max_violation(counts: Tensor) -> Tensor:
    """MaxVio (Wang et al. 2024, arXiv 2408.15664): (max_e load_e − mean_e load_e) / mean_e load_e.

    0 at perfect balance; E − 1 when one expert takes every token. Per layer for (L, E) input;
    average over layers for the paper's single number.
    """
    load = counts.double()
    mean = load.mean(-1)
    return (load.amax(-1) - mean) / mean


def expert_utilisation(counts: Tensor) -> Tensor:
    """Each expert's load relative to perfect balance: load_e / mean_e load_e (1 = balanced)."""
    load = counts.double()
    return load / load.mean(-1, keepdim=True)


def dead_experts(counts: Tensor) -> Tensor:
    """Number of experts that received no token (per layer)."""
    return (counts == 0).sum(-1)


def usage_entropy(counts: Tensor, normalized: bool = True) -> Tensor:
    """Entropy of the expert-usage histogram, H(c/Σc); divided by log E when ``normalized``."""
    p = counts.double() / counts.double().sum(-1, keepdim=True)
    entropy = -plogp(p).sum(-1)
    return entropy / torch.log(torch.tensor(float(counts.shape[-1]))) if normalized else entropy


def entropy(probs: Tensor, normalized: bool = True) -> Tensor:
    """H(p) = −Σ_e p_e log p_e of each distribution over the last dimension (E experts),
    divided by log E when ``normalized`` (1 = uniform routing, 0 = one expert). 0·log 0 = 0
    with a finite gradient (DESIGN.md §4; :func:`moealign.nn.functional.plogp`), so it can be
    trained through (the guardrails' entropy bonus) also where routing has collapsed."""
    p = probs.double()
    value = -plogp(p).sum(-1)
    return value / torch.log(torch.tensor(float(probs.shape[-1]))) if normalized else value


def token_entropy(probs_TE: Tensor, normalized: bool = True) -> Tensor:
    """Mean per-token router entropy (1/T) Σ_t H(p_t·); divided by log E when ``normalized``."""
    return entropy(probs_TE, normalized).mean()


def projection_alignment(router_rows_ED: Tensor, w_gate_EFD: Tensor) -> Tensor:
    """Projection alignment (MPI paper Eq. 11), per expert, in float64 with an exact SVD.

    λ_e = ‖W_g[e] r_e‖₂ / (‖r_e‖₂ · σ_max(W_g[e])) ∈ [0, 1]; 1 when r_e is the principal right
    singular direction of W_g[e] (stored F×D). Pass the effective router rows (r'_e for MPI).
    The paper reports the mean over experts per layer (0.22–0.37 plain, 0.62–0.70 MPI).
    An expert whose router row or matrix holds a non-finite value (a diverged run) gets NaN
    instead of an SVD error.
    """
    rows = router_rows_ED.detach().double()
    matrices = w_gate_EFD.detach().double()
    finite_E = torch.isfinite(matrices).all(dim=(-2, -1)) & torch.isfinite(rows).all(dim=-1)
    matrices = torch.where(finite_E[:, None, None], matrices, 0.0)
    projected = torch.linalg.vector_norm(torch.einsum("efd,ed->ef", matrices, rows), dim=-1)
    sigma_max = torch.linalg.matrix_norm(matrices, ord=2)
    alignment = projected / (torch.linalg.vector_norm(rows, dim=-1) * sigma_max)
    return torch.where(finite_E, alignment, torch.nan)


def routing_projection_alignment(model: nn.Module, rows: str = "effective") -> list[float]:
    """Per MoE layer (depth order) the mean over experts of the projection alignment
    λ_e = ‖W_g[e] r_e‖₂ / (‖r_e‖₂ σ_max(W_g[e])) (DESIGN.md §3, MPI paper Eq. 11). ``rows``:
    ``effective`` takes r_e = the row that routes (C · retract(power(R)) for MPI routers, the
    stored row otherwise, so R_eff for a precomputed router); ``raw`` the stored row R."""
    if rows not in ("effective", "raw"):
        raise ValueError(f"rows={rows!r} is not accepted; choose 'effective' or 'raw'")
    alignments = []
    for layer in model.modules():
        if not isinstance(layer, MoELayer):
            continue
        router = layer.router
        with torch.no_grad():
            if isinstance(router, MPIRouter) and rows == "effective":
                rows_ED = router.effective_weight(layer.router_drive_matrix())
            else:
                rows_ED = router.weight
            alignment_E = projection_alignment(rows_ED, layer.per_row(layer.experts.w_gate))
        alignments.append(float(alignment_E.mean()))
    return alignments
