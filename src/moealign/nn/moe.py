"""The MoE layer: router + stacked SwiGLU experts (+ optional shared expert) (DESIGN.md §2).

x (..., D) → router → (topk_weight, topk_idx) → experts → y (..., D), with a
:class:`RoutingInfo` holding what the router decided and the layer's auxiliary loss terms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moealign.nn.experts import SwiGLUExperts, count_slots_per_expert, init_swiglu_
from moealign.nn.losses import BALANCE_SCOPES, load_balance_loss, z_loss
from moealign.nn.routers import MPIRouter, Router, SoftmaxTopKRouter, build_router


@dataclass
class RoutingInfo:
    """One MoE layer's routing for T = prod(x.shape[:-1]) tokens.

    ``logits`` (T, E) fp32 pre-softmax; ``probs`` (T, E) full softmax; ``topk_idx``/
    ``topk_weight`` (T, K); ``keep`` (T, K) or None when dropless; ``expert_counts`` (E,) slots
    each expert processed; ``load_balance_loss`` and ``z_loss`` (scalars, uncoefficiented).
    """

    logits: Tensor
    probs: Tensor
    topk_idx: Tensor
    topk_weight: Tensor
    keep: Tensor | None
    expert_counts: Tensor
    load_balance_loss: Tensor
    z_loss: Tensor


class SwiGLU(nn.Module):
    """Dense SwiGLU FFN y = W_down (silu(W_gate x) ⊙ W_up x): dense baseline and shared expert.

    Initialised by the same fan-in rule as the routed experts (:func:`init_swiglu_`), not by
    ``nn.Linear``'s U(±1/√fan_in) (std 1/√(3·fan_in)), so dense and MoE models start alike.
    """

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w_gate = nn.Linear(d_model, d_ff, bias=False)
        self.w_up = nn.Linear(d_model, d_ff, bias=False)
        self.w_down = nn.Linear(d_ff, d_model, bias=False)
        self.reset_parameters()

    def reset_parameters(self, residual_scale: float = 1.0) -> None:
        init_swiglu_(self.w_gate.weight, self.w_up.weight, self.w_down.weight, residual_scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class MoELayer(nn.Module):
    """Mixture-of-Experts SwiGLU layer.

    ``MoELayer(d_model, d_ff, n_experts, top_k, router=kind, **router_options)``;
    ``y, info = layer(x)`` for x of shape (..., d_model). Router kinds and options: see
    :mod:`moealign.nn.routers`. ``balance_scope`` "batch" (per micro-batch), "global" (expert
    fractions summed over data-parallel ranks) or "sequence" (per row of a (B, S, D) input).
    ``shared_d_ff`` adds an always-on shared SwiGLU expert. ``merged_experts`` = E′ (None: E′ =
    E) gives a merged layer (router mapping R2, :mod:`moealign.compression.plan`): the router
    keeps its E rows, E′ experts run, and row e's gate goes to expert ``expert_map[e]`` (a
    buffer, (E,) int64, set from the state dict), so a token whose top-k rows share an expert
    gets that expert with their summed weight: y = Σ_k w_k · expert_{map[idx_k]}(x). Routing
    (logits, probs, top-k, expert counts, the balance loss) stays over the E rows.
    ``probs_override`` (None by default) replaces the routing softmax before the experts run
    (:meth:`Router.reroute`); set it through
    :meth:`moealign.nn.routed.MoealignRouted.override_routing`.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        n_experts: int,
        top_k: int,
        router: str = "softmax_topk",
        *,
        balance_scope: str = "batch",
        experts_implementation: str = "auto",
        shared_d_ff: int | None = None,
        merged_experts: int | None = None,
        **router_options,
    ):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_ff", d_ff)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name}={value!r} is not accepted; expected an integer >= 1")
        if balance_scope not in BALANCE_SCOPES:
            raise ValueError(
                f"balance_scope={balance_scope!r} is not accepted; choose one of {BALANCE_SCOPES}"
            )
        self.d_model, self.n_experts = d_model, n_experts
        self.balance_scope = balance_scope
        self.router: Router = build_router(router, d_model, n_experts, top_k, **router_options)
        self.top_k = self.router.top_k
        stored = n_experts if merged_experts is None else merged_experts
        if not (isinstance(stored, int) and 1 <= stored <= n_experts):
            raise ValueError(
                f"merged_experts={merged_experts!r} is not accepted; expected None or an "
                f"integer from 1 to n_experts={n_experts}"
            )
        self.experts = SwiGLUExperts(stored, d_model, d_ff, experts_implementation)
        self.expert_map: Tensor | None
        if merged_experts is None:
            self.expert_map = None
        else:
            self.register_buffer("expert_map", torch.arange(n_experts) % merged_experts)
        self.shared_expert = SwiGLU(d_model, shared_d_ff) if shared_d_ff else None
        # Set by moealign.nn.routed.MoealignRouted.override_routing: probs (..., E) -> new probs
        # (..., E), applied through Router.reroute (test-time re-mixing, oracle routing).
        self.probs_override: Callable[[Tensor], Tensor] | None = None

    def router_drive_matrix(self) -> Tensor:
        """The (E, F, D) matrix A whose AᵀA drives the MPI power step (DESIGN.md §3)."""
        choice = getattr(self.router, "expert_matrix", "gate")
        if choice == "gate":
            matrix = self.experts.w_gate
        elif choice == "up":
            matrix = self.experts.w_up
        else:  # W_oᵀW_o analogue: (E, D, F) → (E, F, D)
            matrix = self.experts.w_down.transpose(1, 2)
        return self.per_row(matrix)  # a merged layer's row e: its expert's matrix

    def per_row(self, expert_tensor: Tensor) -> Tensor:
        """A per-expert tensor (E′, ...) as one entry per router row (E, ...): row e's is its
        expert's, ``expert_map[e]`` in a merged layer (the tensor itself otherwise)."""
        if self.expert_map is None:
            return expert_tensor
        return expert_tensor.index_select(0, self.expert_map)

    def forward(self, x: Tensor) -> tuple[Tensor, RoutingInfo]:
        if x.shape[-1] != self.d_model:
            raise ValueError(
                f"input width {x.shape[-1]} does not match d_model={self.d_model} "
                f"(input shape {tuple(x.shape)})"
            )
        x_TD = x.reshape(-1, self.d_model)
        drive = self.router_drive_matrix() if isinstance(self.router, MPIRouter) else None
        routed = self.router(x_TD, drive)
        if self.probs_override is not None:
            probs_NE = routed.probs.view(*x.shape[:-1], self.n_experts)
            routed = self.router.reroute(
                routed, self.probs_override(probs_NE).view_as(routed.probs)
            )
        expert_idx = routed.topk_idx
        if self.expert_map is not None:
            expert_idx = self.expert_map[expert_idx]
        y_TD = self.experts(x_TD, expert_idx, routed.topk_weight, routed.keep)
        if self.shared_expert is not None:
            y_TD = y_TD + self.shared_expert(x_TD)
        info = RoutingInfo(
            logits=routed.logits,
            probs=routed.probs,
            topk_idx=routed.topk_idx,
            topk_weight=routed.topk_weight,
            keep=routed.keep,
            expert_counts=self._expert_counts(routed.topk_idx, routed.keep),
            load_balance_loss=load_balance_loss(
                routed.probs,
                routed.topk_idx,
                self.n_experts,
                scope=self._balance_scope(),
                sequence_length=x.shape[-2] if x.dim() >= 3 else None,
            ),
            z_loss=z_loss(routed.logits),
        )
        return y_TD.view(x.shape).to(x.dtype), info

    def _balance_scope(self) -> str:
        """The ``global`` scope all-reduces counts inside the forward, which every rank then
        must run: only training forwards do (evaluation and generation may run on one rank),
        so other forwards report the per-micro-batch (``batch``) loss."""
        if self.balance_scope == "global" and not (self.training and torch.is_grad_enabled()):
            return "batch"
        return self.balance_scope

    def _expert_counts(self, topk_idx_TK: Tensor, keep_TK: Tensor | None) -> Tensor:
        chosen = (
            topk_idx_TK if keep_TK is None else topk_idx_TK.masked_fill(~keep_TK, self.n_experts)
        )
        return count_slots_per_expert(chosen, self.n_experts)


def precompute_routers(module: nn.Module) -> nn.Module:
    """Replace every MPI router in ``module`` by a plain router holding R_eff (DESIGN.md §3).

    R_eff = C · normalize(power(R)) is computed once from the current expert weights; routing
    with it is identical to the MPI forward at zero extra cost. Temperature, expert bias and
    the other shared options carry over. Returns the module (changed in place).

    A routed layer is any module with a ``router`` attribute and a ``router_drive_matrix()``
    method: :class:`MoELayer`, and the gate that ``moealign.integrations.hf.swap_routers``
    puts into a Hugging Face MoE block.
    """
    for layer in module.modules():
        mpi = getattr(layer, "router", None)
        if isinstance(mpi, MPIRouter) and hasattr(layer, "router_drive_matrix"):
            shared_options = Router.options(mpi)  # the base-class options only, not MPI's own
            plain = SoftmaxTopKRouter(mpi.d_model, mpi.n_experts, mpi.top_k, **shared_options)
            with torch.no_grad():
                plain.weight.copy_(mpi.effective_weight(layer.router_drive_matrix()))
                if mpi.expert_bias is not None:
                    plain.expert_bias.copy_(mpi.expert_bias)
            layer.router = plain.to(device=mpi.weight.device).train(mpi.training)
    return module


@torch.no_grad()
def update_expert_biases(module: nn.Module, applied: bool = True) -> None:
    """Apply the aux-loss-free bias update to every router in ``module`` after optimizer.step;
    with ``applied=False`` (a skipped step) drop the counts gathered since the last update."""
    for router in module.modules():
        if not isinstance(router, Router):
            continue
        if applied:
            router.update_expert_bias()
        elif router.expert_bias is not None:
            router.tokens_per_expert.zero_()
