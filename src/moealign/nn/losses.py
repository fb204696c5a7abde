"""Auxiliary routing losses (DESIGN.md §4).

All of them read the full softmax ``probs_TE`` and raw ``logits_TE`` of a router, never the
top-k-renormalised weights (research-anchors.md §1.11, pitfall 2).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

BALANCE_SCOPES = ("batch", "sequence", "global")


def load_balance_loss(
    probs_TE: Tensor,
    topk_idx_TK: Tensor,
    n_experts: int,
    scope: str = "batch",
    sequence_length: int | None = None,
) -> Tensor:
    """Switch/Megatron load-balance loss L_bal = E · Σ_e f_e P_e (1 at perfect balance).

    f_e = (1/(T·K)) Σ_t 1[e ∈ topk(t)] (no gradient), P_e = (1/T) Σ_t p_te (full softmax).
    ``scope="sequence"`` computes f and P per sequence of ``sequence_length`` consecutive tokens
    and averages the per-sequence losses (the MPI code's form). ``scope="global"`` takes f from
    the counts of every data-parallel rank (summed over the default process group, when one is
    running; else this micro-batch) and P from this rank's tokens: averaged over ranks, as DDP
    averages gradients, the loss and its gradient equal the batch-scope loss of the whole global
    batch (ranks of equal token counts; Megatron's ``global_aux_loss`` without the running
    average over accumulation steps).
    """
    if scope not in BALANCE_SCOPES:
        raise ValueError(f"balance_scope={scope!r} is not accepted; choose one of {BALANCE_SCOPES}")
    if probs_TE.shape[-1] != n_experts:
        raise ValueError(f"probs has {probs_TE.shape[-1]} experts but n_experts={n_experts}")
    n_tokens, top_k = topk_idx_TK.shape
    if scope in ("batch", "global"):
        sequence_length = n_tokens
    elif sequence_length is None or sequence_length < 1 or n_tokens % sequence_length:
        raise ValueError(
            f"sequence_length={sequence_length!r} must divide the {n_tokens} tokens "
            "for balance_scope='sequence'"
        )
    n_sequences = n_tokens // sequence_length
    # Count (sequence, expert) pairs with one scatter-add into the flattened (B·E) table.
    sequence_of_token_T1 = (
        torch.arange(n_tokens, device=probs_TE.device).unsqueeze(1) // sequence_length
    )
    cell_S = (sequence_of_token_T1 * n_experts + topk_idx_TK).reshape(-1)
    counts_BE = (
        torch.zeros(n_sequences * n_experts, device=probs_TE.device, dtype=probs_TE.dtype)
        .scatter_add_(0, cell_S, torch.ones_like(cell_S, dtype=probs_TE.dtype))
        .view(n_sequences, n_experts)
    )
    slots = torch.tensor(float(sequence_length * top_k), device=probs_TE.device)
    if scope == "global" and dist.is_available() and dist.is_initialized():
        counts_BE = counts_BE.detach().clone()
        dist.all_reduce(counts_BE)
        dist.all_reduce(slots)
    fraction_BE = counts_BE / slots.to(probs_TE.dtype)
    mean_prob_BE = probs_TE.view(n_sequences, sequence_length, n_experts).mean(1)
    return n_experts * (fraction_BE * mean_prob_BE).sum(-1).mean()


def z_loss(logits_TE: Tensor) -> Tensor:
    """Router z-loss (ST-MoE, arXiv 2202.08906): L_z = (1/T) Σ_t (logsumexp_e logits_te)²."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()
