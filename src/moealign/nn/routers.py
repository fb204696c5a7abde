"""MoE routers (DESIGN.md §2 and §3).

Every router maps tokens x_TD to a :class:`RouterOutput`:
``logits`` (T, E, fp32, after temperature, before softmax; softmax(logits) == probs),
``probs`` (T, E, the full softmax; what auxiliary losses and diagnostics read),
``topk_idx``/``topk_weight`` (T, K) and ``keep`` (T, K; False for slots dropped by a capacity
factor, None when dropless).

Kinds: ``softmax_topk`` (Mixtral), ``switch`` (top-1 Switch Transformer), ``hierarchical``
(nested: p(e|x) = p(g|x)·p(e|g,x)) and ``mpi`` (Manifold Power Iteration, §3). Options shared by
all kinds: ``temperature``, ``logit_dropout`` (in training, :func:`drop_logits`), ``jitter``,
``expert_bias`` (aux-loss-free, DeepSeek-V3), ``bias_update_rate``, ``capacity_factor`` and
``normalize_topk``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from moealign.nn.checkpointing import is_recomputing
from moealign.nn.experts import count_slots_per_expert

ROUTER_KINDS = ("softmax_topk", "switch", "hierarchical", "mpi")
MPI_EXPERT_MATRICES = ("gate", "up", "down")


@dataclass
class RouterOutput:
    logits: Tensor
    probs: Tensor
    topk_idx: Tensor
    topk_weight: Tensor
    keep: Tensor | None = None


class OptionError(ValueError):
    """A router size or option out of range: ``option`` = ``value`` given, ``accepted`` says
    what is (read by :class:`moealign.config.ModelConfig` to name the config field)."""

    def __init__(self, option: str, value: object, accepted: str) -> None:
        super().__init__(f"{option}={value!r} is not accepted; expected {accepted}")
        self.option, self.value, self.accepted = option, value, accepted


def _check(name: str, value: object, ok: bool, accepted: str) -> None:
    if not ok:
        raise OptionError(name, value, accepted)


class Router(nn.Module):
    """Linear softmax top-K router: logits = x Wᵀ / τ; probs = softmax(logits); top-K.

    Selection uses ``logits + expert_bias`` (the bias steers choice only, DeepSeek-V3); weights
    are gathered from the unbiased ``probs`` and, if ``normalize_topk``, renormalised over the
    chosen K (identical to a softmax over the chosen logits, Mixtral).
    """

    kind = "softmax_topk"

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        top_k: int,
        *,
        temperature: float = 1.0,
        logit_dropout: float = 0.0,
        jitter: float = 0.0,
        expert_bias: bool = False,
        bias_update_rate: float = 1e-3,
        capacity_factor: float | None = None,
        normalize_topk: bool = True,
    ):
        super().__init__()
        _check("n_experts", n_experts, n_experts >= 1, "an integer >= 1")
        _check("top_k", top_k, 1 <= top_k <= n_experts, f"1 <= top_k <= n_experts={n_experts}")
        _check("temperature", temperature, temperature > 0, "a float > 0")
        _check("logit_dropout", logit_dropout, 0 <= logit_dropout < 1, "0 <= p < 1")
        _check("jitter", jitter, 0 <= jitter < 1, "0 <= eps < 1")
        _check("bias_update_rate", bias_update_rate, bias_update_rate >= 0, "a float >= 0")
        _check(
            "capacity_factor",
            capacity_factor,
            capacity_factor is None or capacity_factor > 0,
            "None (dropless) or a float > 0",
        )
        self.d_model, self.n_experts, self.top_k = d_model, n_experts, top_k
        self.temperature = temperature
        self.logit_dropout = logit_dropout
        self.jitter = jitter
        self.bias_update_rate = bias_update_rate
        self.capacity_factor = capacity_factor
        self.normalize_topk = normalize_topk
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(d_model))
        if expert_bias:
            self.register_buffer("expert_bias", torch.zeros(n_experts))
            self.register_buffer("tokens_per_expert", torch.zeros(n_experts), persistent=False)
        else:
            self.expert_bias = None

    def options(self) -> dict:
        """The shared options, as keyword arguments that rebuild this router."""
        return dict(
            temperature=self.temperature,
            logit_dropout=self.logit_dropout,
            jitter=self.jitter,
            expert_bias=self.expert_bias is not None,
            bias_update_rate=self.bias_update_rate,
            capacity_factor=self.capacity_factor,
            normalize_topk=self.normalize_topk,
        )

    def forward(self, x_TD: Tensor, expert_weight_EFD: Tensor | None = None) -> RouterOutput:
        if self.training and self.jitter > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1 - self.jitter, 1 + self.jitter)
        # fp32 at least (float64 stays float64, for references), whatever the activation dtype,
        # and outside autocast, which would run the router matmuls in bf16.
        x_TD = x_TD.to(torch.promote_types(x_TD.dtype, torch.float32))
        with torch.autocast(x_TD.device.type, enabled=False):
            logits_TE = self.compute_logits(x_TD, expert_weight_EFD) / self.temperature
        if self.training and self.logit_dropout > 0:
            logits_TE = drop_logits(logits_TE, self.logit_dropout)
        probs_TE = self.compute_probs(logits_TE)
        selection_TE = self.selection_scores(logits_TE, probs_TE)
        if self.expert_bias is not None:
            selection_TE = selection_TE + self.expert_bias
        topk_idx_TK, topk_weight_TK = self.select_topk(selection_TE, probs_TE)
        keep_TK = None
        if self.capacity_factor is not None:
            keep_TK = capacity_keep_mask(topk_idx_TK, self.n_experts, self.capacity_factor)
            topk_weight_TK = topk_weight_TK * keep_TK
        # Counted once per training forward: not again when activation checkpointing reruns it.
        if (
            self.expert_bias is not None
            and self.training
            and torch.is_grad_enabled()
            and not is_recomputing()
        ):
            counted = (
                topk_idx_TK
                if keep_TK is None
                else topk_idx_TK.masked_fill(~keep_TK, self.n_experts)
            )
            self.tokens_per_expert += count_slots_per_expert(counted, self.n_experts)
        return RouterOutput(logits_TE, probs_TE, topk_idx_TK, topk_weight_TK, keep_TK)

    def select_topk(self, selection_TE: Tensor, probs_TE: Tensor) -> tuple[Tensor, Tensor]:
        """The K experts with the largest ``selection_TE`` and their weights gathered from
        ``probs_TE`` (renormalised over the K when ``normalize_topk``)."""
        topk_idx_TK = torch.topk(selection_TE, self.top_k, dim=-1).indices
        topk_weight_TK = probs_TE.gather(-1, topk_idx_TK)
        if self.normalize_topk:
            topk_weight_TK = topk_weight_TK / topk_weight_TK.sum(-1, keepdim=True)
        return topk_idx_TK, topk_weight_TK

    def reroute(self, routed: RouterOutput, probs_TE: Tensor) -> RouterOutput:
        """Route the tokens whose routing softmax is replaced by ``probs_TE`` (rows equal to
        ``routed.probs`` keep the router's own decision bit for bit).

        For a changed token t: the top-K experts are re-selected from the new probabilities
        (no expert bias, no group restriction), their weights are the new probabilities
        gathered at those K (renormalised when ``normalize_topk``), ``logits`` = log p (so
        softmax(logits) = p still holds) and the token is never dropped by a capacity factor.
        Gradients flow from the weights into ``probs_TE``. Used by test-time re-mixing (C3PO)
        and oracle routing (DESIGN.md §5) through :mod:`moealign.nn.routed`.
        """
        changed_T = (probs_TE != routed.probs).any(-1)
        changed_TK = changed_T.unsqueeze(-1)
        new_idx_TK, new_weight_TK = self.select_topk(probs_TE, probs_TE)
        return RouterOutput(
            logits=torch.where(changed_TK, probs_TE.log(), routed.logits),
            probs=probs_TE,
            topk_idx=torch.where(changed_TK, new_idx_TK, routed.topk_idx),
            topk_weight=torch.where(changed_TK, new_weight_TK, routed.topk_weight),
            keep=None if routed.keep is None else routed.keep | changed_TK,
        )

    def compute_logits(self, x_TD: Tensor, expert_weight_EFD: Tensor | None) -> Tensor:
        return x_TD @ self.weight.to(x_TD.dtype).T

    def compute_probs(self, logits_TE: Tensor) -> Tensor:
        return torch.softmax(logits_TE, dim=-1)

    def selection_scores(self, logits_TE: Tensor, probs_TE: Tensor) -> Tensor:
        return logits_TE

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        """Aux-loss-free balancing (DeepSeek-V3; DESIGN.md §2): b_e += u · sign(mean(c) − c_e).

        Counts c are accumulated over the training forwards since the last update and summed
        across data-parallel ranks when a process group is running; then they are reset.
        """
        if self.expert_bias is None:
            return
        counts_E = self.tokens_per_expert
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts_E)
        self.expert_bias += self.bias_update_rate * torch.sign(counts_E.mean() - counts_E)
        counts_E.zero_()

    def extra_repr(self) -> str:
        sizes = f"d_model={self.d_model}, n_experts={self.n_experts}, top_k={self.top_k}"
        return f"kind={self.kind}, {sizes}"


class SoftmaxTopKRouter(Router):
    """``softmax_topk``: the plain linear router of :class:`Router`."""


class SwitchRouter(Router):
    """``switch`` (Switch Transformer): top-1. The weight is the chosen probability itself, not
    renormalised (a renormalised top-1 weight is always 1 and gives the router no gradient)."""

    kind = "switch"

    def __init__(self, d_model: int, n_experts: int, top_k: int = 1, **options):
        _check("top_k", top_k, top_k == 1, "1 for the switch router")
        options.setdefault("normalize_topk", False)
        super().__init__(d_model, n_experts, 1, **options)


class HierarchicalRouter(Router):
    """``hierarchical`` (nested MoE): experts in G groups of E/G.

    p(g|x) = softmax_g(x W_groupᵀ), p(e|g,x) = softmax over e in g of (x Wᵀ), and
    p(e|x) = p(g|x)·p(e|g,x). ``logits`` are log p(g|x) + log p(e|g,x) shifted by logsumexp of
    the group logits, i.e. logits_te = z_g + (l_e − logsumexp_{e'∈g} l_e'), so softmax(logits)
    = p(e|x) and the z-loss acts on the group logits. Selection keeps the ``topk_groups`` most
    probable groups and takes the top-K experts (by p(e|x)) only inside them.
    """

    kind = "hierarchical"

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        top_k: int,
        *,
        n_groups: int = 2,
        topk_groups: int = 1,
        **options,
    ):
        super().__init__(d_model, n_experts, top_k, **options)
        _check(
            "n_groups",
            n_groups,
            n_groups >= 1 and n_experts % n_groups == 0,
            f"a divisor of n_experts={n_experts}",
        )
        _check(
            "topk_groups",
            topk_groups,
            1 <= topk_groups <= n_groups,
            f"1 <= topk_groups <= n_groups={n_groups}",
        )
        per_group = n_experts // n_groups
        _check(
            "top_k",
            top_k,
            top_k <= topk_groups * per_group,
            f"<= topk_groups * experts per group = {topk_groups * per_group}",
        )
        self.n_groups, self.topk_groups = n_groups, topk_groups
        self.group_weight = nn.Parameter(torch.empty(n_groups, d_model))
        nn.init.normal_(self.group_weight, std=1.0 / math.sqrt(d_model))

    def options(self) -> dict:
        return super().options() | dict(n_groups=self.n_groups, topk_groups=self.topk_groups)

    def compute_logits(self, x_TD: Tensor, expert_weight_EFD: Tensor | None) -> Tensor:
        group_logits_TG = x_TD @ self.group_weight.to(x_TD.dtype).T
        expert_logits_TGX = (x_TD @ self.weight.to(x_TD.dtype).T).unflatten(-1, (self.n_groups, -1))
        within_TGX = expert_logits_TGX - expert_logits_TGX.logsumexp(-1, keepdim=True)
        return (group_logits_TG.unsqueeze(-1) + within_TGX).flatten(-2)

    def selection_scores(self, logits_TE: Tensor, probs_TE: Tensor) -> Tensor:
        probs_TGX = probs_TE.unflatten(-1, (self.n_groups, -1))
        group_probs_TG = probs_TGX.sum(-1)
        chosen_TG = torch.zeros_like(group_probs_TG, dtype=torch.bool)
        chosen_TG.scatter_(-1, group_probs_TG.topk(self.topk_groups, dim=-1).indices, True)
        # Experts outside the chosen groups can never be selected, even with an expert bias.
        masked_TGX = logits_TE.unflatten(-1, (self.n_groups, -1)).masked_fill(
            ~chosen_TG.unsqueeze(-1), float("-inf")
        )
        return masked_TGX.flatten(-2)


class PowerStep(torch.autograd.Function):
    """One MPI power step u_e = A_eᵀ (A_e r_e) for all experts (DESIGN.md §3), never forming AᵀA.

    Forward: p_e = A_e r_e, u_e = A_eᵀ p_e (two batched matrix-vector products). Backward, for
    g_e = ∂L/∂u_e: ∂L/∂r_e = A_eᵀ A_e g_e (AᵀA is symmetric) and
    ∂L/∂A_e = p_e g_eᵀ + (A_e g_e) r_eᵀ, a rank-2 (F, D) update written by one batched matmul.
    Autograd through the two products would write two (E, F, D) outer products, add them and
    copy transposed operands: several passes over the expert weights instead of one.
    """

    @staticmethod
    def forward(ctx, matrix_EFD: Tensor, rows_ED: Tensor) -> Tensor:
        projected_EF1 = torch.bmm(matrix_EFD, rows_ED.unsqueeze(-1))
        ctx.save_for_backward(matrix_EFD, rows_ED, projected_EF1)
        return torch.bmm(projected_EF1.transpose(1, 2), matrix_EFD).squeeze(1)

    @staticmethod
    def backward(ctx, grad_ED: Tensor) -> tuple[Tensor | None, Tensor | None]:
        matrix_EFD, rows_ED, projected_EF1 = ctx.saved_tensors
        grad_projected_EF1 = torch.bmm(matrix_EFD, grad_ED.unsqueeze(-1))
        grad_matrix_EFD = grad_rows_ED = None
        if ctx.needs_input_grad[0]:
            left_EF2 = torch.cat([projected_EF1, grad_projected_EF1], dim=-1)
            right_E2D = torch.stack([grad_ED, rows_ED], dim=1)
            grad_matrix_EFD = torch.bmm(left_EF2, right_E2D)
        if ctx.needs_input_grad[1]:
            grad_rows_ED = torch.bmm(grad_projected_EF1.transpose(1, 2), matrix_EFD).squeeze(1)
        return grad_matrix_EFD, grad_rows_ED


def mpi_rows(
    rows_ED: Tensor,
    matrix_EFD: Tensor,
    *,
    scale: float,
    power_steps: int = 1,
    retract: bool = True,
    power: bool = True,
    detach_experts: bool = False,
    sum_partial: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """The MPI router rows (DESIGN.md §3): ``scale`` · retract(power(r_e)) for each row r_e of
    ``rows_ED`` with its expert's drive matrix A_e = ``matrix_EFD[e]``, in fp32 (or wider).

    ``power_steps`` steps u_e = A_eᵀ(A_e r_e) (:class:`PowerStep`; rows re-normalised between
    steps when retracting), then r'_e = u_e/‖u_e‖ if ``retract``; ``power=False`` skips the
    steps ("normalisation only"). ``sum_partial``, when A_e is split by rows over ranks (expert
    tensor parallelism: A_e = [A_e¹; A_e²; …]), sums each rank's partial A_eⁱᵀ(A_eⁱ r_e) into
    u_e = Σ_i A_eⁱᵀA_eⁱ r_e (an autograd-aware all-reduce). :class:`MPIRouter` and the engine
    drop-ins (:mod:`moealign.engines`) share this function.
    """
    dtype = torch.promote_types(rows_ED.dtype, torch.float32)
    rows_ED = rows_ED.to(dtype)
    if power:
        matrix_EFD = matrix_EFD.to(dtype)
        if detach_experts:
            matrix_EFD = matrix_EFD.detach()
        for step in range(power_steps):
            if step > 0 and retract:
                rows_ED = F.normalize(rows_ED, dim=-1)  # keeps long iterations finite
            rows_ED = PowerStep.apply(matrix_EFD, rows_ED)
            if sum_partial is not None:
                rows_ED = sum_partial(rows_ED)
    if retract:
        rows_ED = F.normalize(rows_ED, dim=-1)
    return scale * rows_ED


class MPIRouter(Router):
    """``mpi``: Manifold Power Iteration router (DESIGN.md §3; arXiv 2606.12397, Eqs. 4–6).

    In every forward pass, for each expert e with drive matrix A_e (F×D; the SwiGLU gate W_g[e]
    by default):

    1. power step  u_e = A_eᵀ (A_e r_e)          (``power_steps`` times; never forms A_eᵀA_e)
    2. retract     r'_e = u_e / ‖u_e‖₂
    3. logits      logits_te = C · ⟨x_t, r'_e⟩ / τ,   C = c_prime / √E.

    A reparameterisation, not an in-place update: R is never overwritten and gradients reach
    both R and A (unless ``detach_experts``). Ablation flags: ``power=False`` gives
    "normalisation only" r' = r/‖r‖; ``retract=False`` uses u_e unnormalised (scaled by C).
    """

    kind = "mpi"

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        top_k: int,
        *,
        c_prime: float = 4.0,
        power_steps: int = 1,
        retract: bool = True,
        power: bool = True,
        detach_experts: bool = False,
        expert_matrix: str = "gate",
        **options,
    ):
        super().__init__(d_model, n_experts, top_k, **options)
        _check("c_prime", c_prime, c_prime > 0, "a float > 0")
        _check(
            "power_steps",
            power_steps,
            isinstance(power_steps, int) and power_steps >= 1,
            "an integer >= 1",
        )
        _check(
            "expert_matrix",
            expert_matrix,
            expert_matrix in MPI_EXPERT_MATRICES,
            f"one of {MPI_EXPERT_MATRICES}",
        )
        self.c_prime, self.power_steps = c_prime, power_steps
        self.retract, self.power = retract, power
        self.detach_experts, self.expert_matrix = detach_experts, expert_matrix

    @property
    def scale(self) -> float:
        """C = C′/√E (the paper's design principle; not C′·√E)."""
        return self.c_prime / math.sqrt(self.n_experts)

    def options(self) -> dict:
        return super().options() | dict(
            c_prime=self.c_prime,
            power_steps=self.power_steps,
            retract=self.retract,
            power=self.power,
            detach_experts=self.detach_experts,
            expert_matrix=self.expert_matrix,
        )

    def effective_weight(self, expert_weight_EFD: Tensor) -> Tensor:
        """R_eff = C · retract(power(R)), shape (E, D), fp32 (or wider); logits = x R_effᵀ / τ."""
        return self.effective_rows(self.weight, expert_weight_EFD)

    def effective_rows(self, rows_ED: Tensor, expert_weight_EFD: Tensor) -> Tensor:
        """C · retract(power(r_e)) for any subset of rows with their experts' drive matrices
        (all E here; an expert-parallel rank's own experts in
        :mod:`moealign.distributed.parallel`)."""
        return mpi_rows(
            rows_ED,
            expert_weight_EFD,
            scale=self.scale,
            power_steps=self.power_steps,
            retract=self.retract,
            power=self.power,
            detach_experts=self.detach_experts,
        )

    def compute_logits(self, x_TD: Tensor, expert_weight_EFD: Tensor | None) -> Tensor:
        if expert_weight_EFD is None:
            raise ValueError("the mpi router needs the expert weights: call it through MoELayer")
        return x_TD @ self.effective_weight(expert_weight_EFD).to(x_TD.dtype).T


ROUTER_CLASSES: dict[str, type[Router]] = {
    "softmax_topk": SoftmaxTopKRouter,
    "switch": SwitchRouter,
    "hierarchical": HierarchicalRouter,
    "mpi": MPIRouter,
}


def build_router(kind: str, d_model: int, n_experts: int, top_k: int, **options) -> Router:
    """Build a router by kind; unknown kinds and options get a ValueError naming them."""
    if kind not in ROUTER_CLASSES:
        raise ValueError(f"router={kind!r} is not accepted; choose one of {ROUTER_KINDS}")
    try:
        return ROUTER_CLASSES[kind](d_model, n_experts, top_k, **options)
    except TypeError as error:
        raise ValueError(f"router option not accepted by router={kind!r}: {error}") from None


def drop_logits(logits_TE: Tensor, p: float) -> Tensor:
    """Logit dropout (DESIGN.md §4): drop expert e for token t by setting logit_te to −inf.

    One draw u_te ~ U[0, 1) per token and expert (float32, from the global generator);
    keep_te = (u_te ≥ p) or (u_te = max_e' u_te'), so each expert is dropped with probability p
    and every token keeps at least one expert (where all draws fall under p, the one with the
    largest draw, a uniformly random expert). Kept logits are left as they are: no 1/(1−p)
    rescaling as in ``F.dropout`` (which would also set a dropped logit to 0, *raising* a
    negative one), so training and evaluation share one temperature. A dropped expert gets
    probability exactly 0; it is selected only when a token keeps fewer than K experts, and then
    with weight 0.
    """
    draws_TE = torch.rand(logits_TE.shape, device=logits_TE.device, dtype=torch.float32)
    keep_TE = (draws_TE >= p) | (draws_TE == draws_TE.amax(-1, keepdim=True))
    return logits_TE.masked_fill(~keep_TE, -math.inf)


def capacity_keep_mask(topk_idx_TK: Tensor, n_experts: int, capacity_factor: float) -> Tensor:
    """Switch-style token dropping: each expert keeps at most ceil(T·K/E · factor) slots.

    Slots are served first come, first served in token order (k-th choices after all (k−1)-th
    choices, as in Switch/GShard), and the rest are dropped (their tokens pass on the residual).
    """
    n_tokens, top_k = topk_idx_TK.shape
    capacity = math.ceil(n_tokens * top_k / n_experts * capacity_factor)
    # Priority order: all first choices in token order, then all second choices, ...
    expert_KT = topk_idx_TK.T.reshape(-1)
    one_hot_SE = F.one_hot(expert_KT, n_experts)
    position_S = (one_hot_SE.cumsum(0) * one_hot_SE).sum(-1) - 1
    return (position_S < capacity).view(top_k, n_tokens).T
