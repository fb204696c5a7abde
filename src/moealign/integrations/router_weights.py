"""A moealign router ↔ the (E, D) weight W of a native softmax top-k router (logits = x Wᵀ) that
routes exactly like it, both ways (DESIGN.md §2–3).

* :func:`linear_router_weight`: W = R/τ (softmax top-k) or R_eff/τ (MPI, the precomputed
  C · normalize((AᵀA)^k R) of §3) — what exports and native checkpoints hold.
* :func:`router_rows_for` inverts it: rows R with which the router computes W again, so that a
  model reloaded from a native checkpoint continues in the moealign parametrisation with the
  same routing. For softmax top-k R = τW. For MPI, with v = τW (the effective rows) and
  u = v/C, R is the minimum-norm solution of (AᵀA)^k R = u (the pseudo-inverse, from the
  SVD A = U S Vᵀ: R = V S^(−2k) Vᵀ u), which MPI maps back to v when v lies in the range of
  Aᵀ (it does for a weight MPI computed); with retraction the rows are rescaled to unit
  length, which the routing does not see. This R is one preimage, not the R the weight came
  from (a native checkpoint does not hold it), so a training run continued from it follows
  the same routing but not the same trajectory.

Shape letters: E experts, D width, F expert hidden width.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moealign.nn.routers import MPIRouter, Router, SoftmaxTopKRouter

EXPORTABLE_ROUTERS = (SoftmaxTopKRouter, MPIRouter)


def _check_expressible(router: Router, normalize_topk: bool) -> None:
    """Refuse (ValueError naming the option) what a native softmax top-k router cannot express:
    other router kinds, a non-zero expert bias, a capacity factor, or a top-k renormalisation
    other than ``normalize_topk`` (the native router's)."""
    if type(router) not in EXPORTABLE_ROUTERS:
        raise ValueError(
            f"router kind={router.kind!r} cannot be exported; exportable kinds: softmax_topk, mpi"
        )
    if router.expert_bias is not None and bool(router.expert_bias.any()):
        raise ValueError(
            "router expert_bias is non-zero: a transformers softmax router has no selection bias"
        )
    if router.capacity_factor is not None:
        raise ValueError(
            f"router capacity_factor={router.capacity_factor} cannot be exported: transformers "
            "MoE layers are dropless (use capacity_factor=None)"
        )
    if router.normalize_topk != normalize_topk:
        raise ValueError(
            f"router normalize_topk={router.normalize_topk} does not match the target's top-k "
            f"renormalisation ({normalize_topk})"
        )


def linear_router_weight(router: Router, drive_EFD: Tensor | None, normalize_topk: bool) -> Tensor:
    """The (E, D) weight W of a plain softmax top-k router that routes exactly like ``router``:
    W = R/τ (softmax top-k) or R_eff/τ (MPI, DESIGN.md §3), detached, fp32 (or wider).

    Refuses (ValueError naming the option) what a native softmax top-k router cannot express:
    other router kinds, a non-zero expert bias, a capacity factor, or a top-k renormalisation
    other than ``normalize_topk`` (the target's)."""
    _check_expressible(router, normalize_topk)
    with torch.no_grad():
        if isinstance(router, MPIRouter):
            rows_ED = router.effective_weight(drive_EFD)
        else:
            rows_ED = router.weight
        return (rows_ED / router.temperature).detach().clone()


def _power_preimage(drive_EFD: Tensor, target_ED: Tensor, steps: int) -> Tensor:
    """Minimum-norm R with (AᵀA)^steps R = target per expert, in float64: R = V S^(−2·steps) Vᵀ
    target over the singular values above 1e-6 · σ_max (the rest are null directions)."""
    _, s_EM, vh_EMD = torch.linalg.svd(drive_EFD.double(), full_matrices=False)
    keep_EM = s_EM > 1e-6 * s_EM[:, :1]
    inverse_EM = torch.where(keep_EM, s_EM.clamp_min(1e-300) ** (-2 * steps), 0.0)
    coordinates_EM = torch.einsum("emd,ed->em", vh_EMD, target_ED.double())
    return torch.einsum("emd,em->ed", vh_EMD, inverse_EM * coordinates_EM)


def router_rows_for(
    router: Router, weight_ED: Tensor, drive_EFD: Tensor | None, normalize_topk: bool
) -> Tensor:
    """Rows R (E, D, fp32) with which ``router`` routes like a native router of weight
    ``weight_ED``: ``linear_router_weight`` of the router holding R gives ``weight_ED`` back
    (see the module docstring; ``drive_EFD`` is the MPI drive matrix A).

    Raises ValueError where no such R exists: what :func:`linear_router_weight` refuses, and
    for MPI a weight whose rows do not have the length C/τ that retraction gives (C = c′/√E),
    or that lies outside the range of the drive matrix (not a weight that MPI computed)."""
    _check_expressible(router, normalize_topk)
    target_ED = weight_ED.detach().double() * router.temperature
    if not isinstance(router, MPIRouter):
        return target_ED.float()
    unit_ED = target_ED / router.scale
    rows_ED = unit_ED
    if router.power:
        rows_ED = _power_preimage(drive_EFD.detach(), unit_ED, router.power_steps)
    if router.retract:
        rows_ED = torch.nn.functional.normalize(rows_ED, dim=-1)
    with torch.no_grad():
        reached_ED = router.effective_rows(rows_ED, drive_EFD.detach().double())
    # The weight may have been stored in 16 bits: compare at its own precision.
    tolerance = max(1e-4, 4 * torch.finfo(weight_ED.dtype).eps)
    error = float((reached_ED - target_ED).norm(dim=-1).max())
    scale = float(target_ED.norm(dim=-1).max())
    if not error <= tolerance * scale:
        norms = [round(v, 4) for v in (target_ED.norm(dim=-1) / router.temperature).tolist()]
        raise ValueError(
            f"the router weight is not one an mpi router with c_prime={router.c_prime}, "
            f"power_steps={router.power_steps}, temperature={router.temperature} computes "
            f"(relative error {error / scale:.2g}): its rows have norms {norms}, an mpi "
            f"router's have C/τ = {router.scale / router.temperature:.4g} (with retraction) "
            "and lie in the range of its drive matrix; swap with kind='mpi' and the options "
            "it was trained with, or without keep_routing to start MPI from these rows"
        )
    return rows_ED.float()
