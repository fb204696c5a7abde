"""Neighbourhoods among successful samples and their kernel weights (DESIGN.md §5; RoMA
Eqs. 3–6).

For query embeddings e_q and reference embeddings e_j (the successful set S):

    sim_qj = exp(−‖e_q − e_j‖² / 2σ²)                      (Gaussian kernel, Eq. 5)
    N(q)   = the k nearest j (kNN, Eq. 3), or {j : sim_qj >= ε} (ε-ball, Eq. 4),
             or k uniformly random j (ablation) — never a j with the query's own id
    W_qj   = sim_qj / Σ_{j'∈N(q)} sim_qj'  for j ∈ N(q)    (Eq. 6)

W is computed as a softmax of −‖e_q − e_j‖²/2σ² over N(q), which equals the normalised kernel
and cannot underflow to 0/0. A query with an empty neighbourhood (an ε-ball holding nobody) has
all-zero weights, so its manifold term is zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moealign.roma.config import NEIGHBOUR_MODES


@dataclass
class Neighbourhood:
    """Per query q: ``index_QK`` reference rows (−1 = padding), ``weight_QK`` W_qj (0 on
    padding; each row sums to 1 unless the neighbourhood is empty)."""

    index_QK: Tensor
    weight_QK: Tensor

    @property
    def valid_QK(self) -> Tensor:
        return self.index_QK >= 0

    def gather(self, values_RP: Tensor) -> Tensor:
        """values of the neighbours, (Q, K, P); padding rows are zero."""
        gathered_QKP = values_RP[self.index_QK.clamp_min(0)]
        return gathered_QKP * self.valid_QK.unsqueeze(-1).to(values_RP.dtype)


def find_neighbours(
    query_QD: Tensor,
    reference_RD: Tensor,
    *,
    mode: str = "knn",
    k: int = 3,
    epsilon: float = 0.5,
    sigma: float = 0.5,
    query_ids: Tensor | None = None,
    reference_ids: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Neighbourhood:
    """N(q) and W for every query (see the module docstring).

    ``query_ids``/``reference_ids`` (Q,)/(R,): a reference with the query's own id is never
    its neighbour (RoMA's released code let a successful sample be its own top neighbour).
    ``k`` is clipped to the references available; ``generator`` seeds the random mode.
    """
    if mode not in NEIGHBOUR_MODES:
        raise ValueError(f"mode={mode!r} is not accepted; choose one of {NEIGHBOUR_MODES}")
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"k={k!r} is not accepted; expected an integer >= 1")
    if not 0 < epsilon <= 1:
        raise ValueError(f"epsilon={epsilon!r} is not accepted; expected 0 < epsilon <= 1")
    if not sigma > 0:
        raise ValueError(f"sigma={sigma!r} is not accepted; expected a float > 0")
    if query_QD.shape[-1] != reference_RD.shape[-1]:
        raise ValueError(
            f"query and reference embeddings differ in width: {query_QD.shape[-1]} vs "
            f"{reference_RD.shape[-1]}"
        )
    n_query, n_reference = query_QD.shape[0], reference_RD.shape[0]
    query_QD, reference_RD = query_QD.double(), reference_RD.double()
    distance2_QR = torch.cdist(query_QD, reference_RD).square()
    allowed_QR = torch.ones(n_query, n_reference, dtype=torch.bool)
    if (query_ids is None) != (reference_ids is None):
        raise ValueError("query_ids and reference_ids: give both or neither")
    if query_ids is not None:
        allowed_QR = query_ids.view(-1, 1) != reference_ids.view(1, -1)
    log_kernel_QR = -distance2_QR / (2 * sigma**2)

    if mode == "epsilon":
        chosen_QR = allowed_QR & (log_kernel_QR.exp() >= epsilon)
        width = max(1, int(chosen_QR.sum(-1).max())) if n_reference else 1
        order_QR = torch.where(chosen_QR, distance2_QR, torch.inf).argsort(dim=-1, stable=True)
        index_QK = order_QR[:, :width]
        valid_QK = chosen_QR.gather(-1, index_QK)
    else:
        width = min(k, n_reference)
        if mode == "knn":
            score_QR = distance2_QR
        else:
            score_QR = torch.rand(n_query, n_reference, generator=generator, dtype=torch.float64)
        score_QR = torch.where(allowed_QR, score_QR, torch.inf)
        index_QK = score_QR.topk(width, dim=-1, largest=False).indices
        valid_QK = allowed_QR.gather(-1, index_QK)
    logits_QK = torch.where(valid_QK, log_kernel_QR.gather(-1, index_QK), -torch.inf)
    weight_QK = torch.softmax(logits_QK, dim=-1).nan_to_num(0.0)  # empty row: 0/0 -> 0
    return Neighbourhood(index_QK=torch.where(valid_QK, index_QK, -1), weight_QK=weight_QK.float())
