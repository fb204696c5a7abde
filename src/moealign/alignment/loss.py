"""The routing alignment loss (DESIGN.md §4; the practitioners' guide, Step 2).

Both functions read the full routing softmax ``probs_TE`` of each MoE layer, never the top-k
renormalised weights (research-anchors.md §1.11, pitfall 2).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from moealign.nn.functional import plogp


def task_routing_distributions(probs_TE: Tensor, task_ids_T: Tensor) -> tuple[Tensor, Tensor]:
    """Per-task routing distributions p(e|τ) = mean of probs_te over the tokens of task τ.

    Tokens with a negative task id (no task) are ignored. Returns (tasks_N, p_NE) for the N
    tasks present, sorted by id.
    """
    task_ids_T = task_ids_T.reshape(-1).to(probs_TE.device)
    if task_ids_T.shape[0] != probs_TE.shape[0]:
        raise ValueError(
            f"task_ids has {task_ids_T.shape[0]} tokens but probs has {probs_TE.shape[0]}"
        )
    labelled = task_ids_T >= 0
    tasks, slot_T = torch.unique(task_ids_T[labelled], return_inverse=True)
    sums_NE = probs_TE.new_zeros(tasks.shape[0], probs_TE.shape[-1])
    sums_NE = sums_NE.index_add(0, slot_T, probs_TE[labelled])
    counts_N = torch.bincount(slot_T, minlength=tasks.shape[0]).to(probs_TE.dtype)
    return tasks, sums_NE / counts_N.unsqueeze(-1)


def routing_alignment_loss(
    probs_per_layer: Sequence[Tensor], task_ids_T: Tensor, prior_LE: Tensor
) -> Tensor:
    """Routing alignment (DESIGN.md §4): L_align = mean_τ Σ_l KL(p_l(·|τ) ‖ q_l).

    ``probs_per_layer``: the full routing softmax (T, E) of each of the L MoE layers, for the
    same T tokens; ``task_ids_T``: each token's task (−1 = none, ignored); ``prior_LE``: the
    fixed prior q_l per layer (no gradient flows into it). Zero (with a graph) when the batch
    holds no task tokens. KL(p ‖ q) = Σ_e p_e log p_e − p_e log q_e with 0·log 0 = 0 and
    finite gradients where p_e = 0 (:func:`moealign.nn.functional.plogp`). Computed in float32,
    or in the inputs' dtype where wider (float64 inputs give a float64 loss).
    """
    if len(probs_per_layer) != prior_LE.shape[0]:
        raise ValueError(
            f"prior has {prior_LE.shape[0]} layers but {len(probs_per_layer)} were given"
        )
    prior_LE = prior_LE.detach()
    total = probs_per_layer[0].new_zeros(())
    n_tasks = 0
    for probs_TE, prior_E in zip(probs_per_layer, prior_LE, strict=True):
        dtype = torch.promote_types(probs_TE.dtype, torch.float32)
        tasks, p_NE = task_routing_distributions(probs_TE.to(dtype), task_ids_T)
        kl_N = (plogp(p_NE) - torch.special.xlogy(p_NE, prior_E.to(p_NE))).sum(-1)
        total = total + kl_N.sum()
        n_tasks = tasks.shape[0]
    if n_tasks == 0:
        return total + 0.0 * sum(p.sum() for p in probs_per_layer)
    return total / n_tasks
