"""Hugging Face MoE models (transformers >= 5): capture routing, swap routers, diagnostics.

Supported families, detected from ``model.config.model_type`` (:data:`FAMILIES`): Mixtral,
OLMoE, Qwen2-MoE, Qwen3-MoE (softmax top-k routers) and DeepSeek-V3 (sigmoid scores, an
``e_score_correction_bias`` for selection, group-limited top-k, ``routed_scaling_factor``, shared
experts). Every family stores a MoE decoder layer's FFN as ``layer.mlp`` with a router
``mlp.gate`` (weight E×D) and fused experts ``mlp.experts`` (``gate_up_proj`` (E, 2F, D) with the
SwiGLU gate rows first, ``down_proj`` (E, D, F)), the layout of DESIGN.md §2.

* :func:`capture_routing` records every router's output with forward hooks (no edit of
  transformers' code) and returns per-layer (B, S, ·) tensors; :func:`routing_diagnostics` turns
  them into the routing statistics of :mod:`moealign.evaluation.routing_stats` (utilisation,
  entropies, MaxVio, balance and z-loss) with the projection alignment, per layer (DESIGN.md
  §3–4).
* :func:`swap_routers` puts a moealign router (``softmax_topk`` or ``mpi``, DESIGN.md §2–3)
  initialised from the existing rows into each ``mlp.gate``; ``precompute_routers`` works on
  the result. A swapped gate's state dict is its native router's: ``mlp.gate.weight`` holds
  the effective router (R_eff/τ for MPI), so ``save_pretrained``, safetensors state dicts and
  HF ``Trainer`` checkpoints reload in plain transformers with the same logits, and loading
  such a weight into a swapped gate (or ``swap_routers(..., keep_routing=True)``) continues
  the moealign parametrisation with the same routing
  (:mod:`moealign.integrations.router_weights`). Swapped gates keep transformers' output
  hooks, so ``output_router_logits=True`` (and the balance loss with ``labels``) works.
* :class:`HFRouted` is the :class:`~moealign.nn.routed.RoutedModel` view used by RoMA (§5); its
  ``override_routing`` replaces chosen layers' routing distribution with forward hooks (C3PO,
  oracle routing).

Shape letters: B batch, S sequence, T = B·S tokens, D width, F expert hidden, E experts, K top-k.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from moealign.evaluation import diagnostics
from moealign.evaluation.routing_stats import RoutingStats
from moealign.integrations.router_weights import linear_router_weight, router_rows_for
from moealign.nn.losses import load_balance_loss, z_loss
from moealign.nn.moe import RoutingInfo
from moealign.nn.routed import ProbsOverride, RoutedOutput, check_override_layers
from moealign.nn.routers import MPIRouter, Router, build_router

SOFTMAX, SIGMOID = "softmax", "sigmoid"


@dataclass(frozen=True)
class Family:
    """A transformers MoE family: how its router scores experts (``softmax`` or ``sigmoid``),
    whether its router hands the experts fp32 top-k weights (Mixtral) or casts them to the
    activation dtype, and a one-line description for messages."""

    name: str
    scoring: str
    fp32_topk_weight: bool
    description: str


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family("mixtral", SOFTMAX, True, "softmax top-k, weights renormalised over the top-k"),
        Family("olmoe", SOFTMAX, False, "softmax top-k, renormalised if norm_topk_prob"),
        Family(
            "qwen2_moe",
            SOFTMAX,
            False,
            "softmax top-k (norm_topk_prob) plus a sigmoid-gated shared expert",
        ),
        Family("qwen3_moe", SOFTMAX, False, "softmax top-k, renormalised if norm_topk_prob"),
        Family(
            "deepseek_v3",
            SIGMOID,
            False,
            "sigmoid scores, e_score_correction_bias for selection, group-limited top-k "
            "(n_group, topk_group), routed_scaling_factor, shared experts",
        ),
    )
}
SWAPPABLE_FAMILIES = tuple(name for name, family in FAMILIES.items() if family.scoring == SOFTMAX)
SWAP_KINDS = ("softmax_topk", "mpi")


def _supported_list() -> str:
    return "; ".join(f"{name} ({family.description})" for name, family in FAMILIES.items())


def detect_family(model: nn.Module) -> Family:
    """The :class:`Family` of a transformers model (or of its config, before loading the
    weights), from ``config.model_type``."""
    model_type = getattr(getattr(model, "config", model), "model_type", None)
    if model_type not in FAMILIES:
        name = type(model).__name__.removesuffix("Config")
        raise ValueError(
            f"model={name} (model_type={model_type!r}) is not a supported "
            f"Hugging Face MoE family; supported: {_supported_list()}"
        )
    return FAMILIES[model_type]


@dataclass(frozen=True)
class MoEBlock:
    """One MoE FFN of a transformers model: its decoder-layer index and the ``mlp`` module."""

    layer: int
    mlp: nn.Module


def moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """The MoE blocks in depth order (dense layers, e.g. DeepSeek's first_k_dense, skipped)."""
    detect_family(model)
    blocks = [
        MoEBlock(index, layer.mlp)
        for index, layer in enumerate(model.base_model.layers)
        if hasattr(layer.mlp, "gate") and hasattr(layer.mlp, "experts")
    ]
    if not blocks:
        raise ValueError(f"model={type(model).__name__} has no MoE layer (no mlp.gate)")
    return blocks


def expert_matrix(experts: nn.Module, which: str = "gate") -> Tensor:
    """An (E, F, D) expert matrix of fused transformers experts: the SwiGLU ``gate`` (the first F
    rows of gate_up_proj), ``up`` (the last F rows), or ``down`` transposed (down_proj is E×D×F)."""
    d_ff = experts.down_proj.shape[-1]
    if which == "gate":
        return experts.gate_up_proj[:, :d_ff]
    if which == "up":
        return experts.gate_up_proj[:, d_ff:]
    if which == "down":
        return experts.down_proj.transpose(1, 2)
    raise ValueError(f"which={which!r} is not accepted; choose one of ('gate', 'up', 'down')")


class GateOutput(tuple):
    """A gate's (logits (T, E), top-k weights (T, K), top-k indices (T, K)), unpacked by the
    transformers block like the native router's tuple, with the routing distribution the
    experts were chosen from attached as ``probs`` (T, E): a moealign router's probs, or the
    distribution a routing override put in place of the router's own."""

    probs: Tensor

    def __new__(cls, logits: Tensor, weight: Tensor, index: Tensor, probs: Tensor) -> GateOutput:
        output = super().__new__(cls, (logits, weight, index))
        output.probs = probs
        return output


class MoealignGate(nn.Module):
    """A moealign :class:`Router` in the place of a transformers block's ``mlp.gate``.

    Called like the native router, ``gate(hidden_states)`` → (logits (T, E), top-k weights
    (T, K), top-k indices (T, K)); ``logits`` are the moealign router's (after temperature), so
    softmax(logits) is its ``probs``. The block's experts are referenced, not owned (the block
    owns them): the MPI power step reads their gate rows every forward (DESIGN.md §3), and
    ``precompute_routers`` finds this module through ``router`` and ``router_drive_matrix``.
    ``probs_override`` (None by default; set by :meth:`HFRouted.override_routing`) maps the
    (T, E) routing softmax to the one to route with, applied by :meth:`Router.reroute`.

    Its state dict is the native router's: ``weight`` = :meth:`native_weight` in the native
    dtype (a router a native gate cannot express raises ValueError on saving); loading a
    ``weight`` into the block sets the router's rows with :func:`router_rows_for` (a hook on
    the block that :func:`swap_routers` registers).
    """

    def __init__(
        self,
        router: Router,
        experts: nn.Module,
        family: Family,
        native_normalize_topk: bool,
        native_dtype: torch.dtype,
    ):
        super().__init__()
        self.router = router
        self._experts = (experts,)  # a tuple keeps the experts out of this module's state_dict
        self.family = family
        self.native_normalize_topk = native_normalize_topk
        self.native_dtype = native_dtype
        self.probs_override: Callable[[Tensor], Tensor] | None = None
        self.register_state_dict_post_hook(_save_native_weight)

    def router_drive_matrix(self, experts: nn.Module | None = None) -> Tensor:
        """The (E, F, D) matrix A of the MPI power step u = Aᵀ(A r) (DESIGN.md §3), of the
        block's experts (or of ``experts``: anything with their ``gate_up_proj``/``down_proj``)."""
        experts = self._experts[0] if experts is None else experts
        return expert_matrix(experts, getattr(self.router, "expert_matrix", "gate"))

    def native_weight(self) -> Tensor:
        """The (E, D) weight of the native router that routes like this gate (fp32): R/τ, or
        R_eff/τ for MPI (:func:`linear_router_weight`)."""
        drive = self.router_drive_matrix() if isinstance(self.router, MPIRouter) else None
        return linear_router_weight(self.router, drive, self.native_normalize_topk)

    def forward(self, hidden_states: Tensor) -> GateOutput:
        x_TD = hidden_states.reshape(-1, self.router.d_model)
        drive_EFD = self.router_drive_matrix() if isinstance(self.router, MPIRouter) else None
        routed = self.router(x_TD, drive_EFD)
        if self.probs_override is not None:
            routed = self.router.reroute(routed, self.probs_override(routed.probs))
        weight_TK = routed.topk_weight
        if not self.family.fp32_topk_weight:
            weight_TK = weight_TK.to(hidden_states.dtype)
        return GateOutput(routed.logits, weight_TK, routed.topk_idx, routed.probs)


def _save_native_weight(gate: MoealignGate, state: dict, prefix: str, metadata: dict) -> None:
    """State-dict post hook: the router's entries become the native gate's ``weight``."""
    for key in [key for key in state if key.startswith(prefix + "router.")]:
        del state[key]
    state[prefix + "weight"] = gate.native_weight().to(gate.native_dtype)


def _load_native_weight(mlp: nn.Module, state: dict, prefix: str, *args) -> None:
    """Load-state-dict pre hook of a block whose gate was swapped: a native ``gate.weight``
    becomes the moealign router's rows (for MPI from the experts' rows in the same state
    dict, which the block sees and the gate does not), and the router's other entries, which
    a native state dict lacks, keep their values."""
    gate = mlp.gate
    if not isinstance(gate, MoealignGate) or prefix + "gate.weight" not in state:
        return
    weight = state.pop(prefix + "gate.weight")
    drive = None
    if isinstance(gate.router, MPIRouter):
        loaded = {
            name: state.get(f"{prefix}experts.{name}", getattr(mlp.experts, name))
            for name in ("gate_up_proj", "down_proj")
        }
        drive = gate.router_drive_matrix(SimpleNamespace(**loaded))
    rows = router_rows_for(gate.router, weight, drive, gate.native_normalize_topk)
    for key, value in gate.router.state_dict(prefix=prefix + "gate.router.").items():
        state.setdefault(key, value)
    state[prefix + "gate.router.weight"] = rows


def _native_normalize_topk(gate: nn.Module) -> bool:
    # Mixtral's router always renormalises; the others follow config.norm_topk_prob.
    return bool(getattr(gate, "norm_topk_prob", True))


def swap_routers(
    model: nn.Module, kind: str = "mpi", *, keep_routing: bool = False, **options
) -> nn.Module:
    """Replace every ``mlp.gate`` by a :class:`MoealignGate` holding a moealign router of
    ``kind`` whose rows R are the current router rows (DESIGN.md §2–3); returns ``model``.

    ``softmax_topk`` reproduces the native softmax routing exactly (same logits, same top-k,
    same renormalisation as the family's ``norm_topk_prob``), so the model is unchanged until
    it is trained. ``mpi`` routes with C · normalize(W_gᵀW_g r) (§3), a new router to
    fine-tune; ``precompute_routers(model)`` then folds it into a plain router. ``options`` are
    moealign router options (``temperature``, ``c_prime``, ``power_steps``, ...).

    ``keep_routing=True`` chooses R so that the new routers route exactly as the current gates
    (:func:`~moealign.integrations.router_weights.router_rows_for`; for MPI a preimage of the
    gate weight, which must be one MPI with these options computes): this continues the MPI
    parametrisation of a model saved after an MPI swap and reloaded in plain transformers.

    Only the softmax families can be swapped: DeepSeek-V3's sigmoid, bias-corrected,
    group-limited routing has no moealign equivalent, and swapping would silently change the
    model. transformers' output-capturing hooks are installed first and moved onto the new
    gates, so ``output_router_logits=True`` records the swapped routers' logits.
    """
    family = detect_family(model)
    if family.scoring != SOFTMAX:
        raise ValueError(
            f"swap_routers does not support the {family.name} family ({family.description}): "
            f"no moealign router reproduces that routing. Supported families: "
            f"{', '.join(SWAPPABLE_FAMILIES)}"
        )
    if kind not in SWAP_KINDS:
        raise ValueError(f"kind={kind!r} is not accepted; choose one of {SWAP_KINDS}")
    from transformers.utils.output_capturing import maybe_install_capturing_hooks

    maybe_install_capturing_hooks(model.base_model)
    blocks = moe_blocks(model)
    new_gates = []  # all built (and checked) before any block changes
    for block in blocks:
        gate = block.mlp.gate
        if isinstance(gate, MoealignGate):
            raise ValueError(
                f"layer {block.layer} already holds a moealign router ({gate.router.kind}); "
                "swap_routers takes a model with its native routers"
            )
        n_experts, d_model = gate.weight.shape
        normalize_topk = _native_normalize_topk(gate)
        router_options = {"normalize_topk": normalize_topk, **options}
        router = build_router(kind, d_model, n_experts, gate.top_k, **router_options)
        new_gate = MoealignGate(
            router, block.mlp.experts, family, normalize_topk, gate.weight.dtype
        )
        rows = gate.weight
        if keep_routing:
            drive = new_gate.router_drive_matrix() if isinstance(router, MPIRouter) else None
            rows = router_rows_for(router, gate.weight, drive, normalize_topk)
        with torch.no_grad():
            router.weight.copy_(rows.float())
        router.to(gate.weight.device)
        new_gate.train(gate.training)
        for hook_id, hook in gate._forward_hooks.items():  # transformers' output capture
            new_gate.register_forward_hook(
                hook, with_kwargs=hook_id in gate._forward_hooks_with_kwargs
            )
        new_gates.append(new_gate)
    for block, new_gate in zip(blocks, new_gates, strict=True):
        block.mlp.gate = new_gate
        block.mlp.register_load_state_dict_pre_hook(_load_native_weight)
    return model


def router_rows(gate: nn.Module) -> Tensor:
    """The effective (E, D) router rows of a gate: R_eff for MPI (§3), the weight otherwise."""
    if isinstance(gate, MoealignGate) and isinstance(gate.router, MPIRouter):
        return gate.router.effective_weight(gate.router_drive_matrix())
    if isinstance(gate, MoealignGate):
        return gate.router.weight
    return gate.weight


# --- routing capture --------------------------------------------------------------------------


@dataclass
class LayerRouting:
    """One MoE layer's routing for a (B, S) batch.

    ``logits`` (B, S, E): what the router computes before scoring (fp32 for moealign routers).
    ``scores`` (B, S, E): the family's own scores: softmax(logits) for softmax families,
    sigmoid(logits) for DeepSeek-V3 (without the selection bias).
    ``probs`` (B, S, E): the routing distribution that diagnostics, losses and RoMA read:
    softmax(logits), or for sigmoid scoring scores / Σ_e scores (a distribution over experts,
    the analogue of the softmax); under :meth:`HFRouted.override_routing`, the distribution
    the override put in place (then ``logits`` = log probs at the changed tokens of softmax
    families, while DeepSeek-V3's ``logits`` and ``scores`` stay the router's own).
    ``topk_idx``/``topk_weight`` (B, S, K): the experts the router chose and the weights it
    handed to them (DeepSeek-V3: after renormalisation and routed_scaling_factor).
    """

    layer: int
    logits: Tensor
    scores: Tensor
    probs: Tensor
    topk_idx: Tensor
    topk_weight: Tensor


@dataclass
class RoutingCapture:
    """Routing of every MoE layer (depth order), the model's output logits (B, S, V) (None for
    a model without a language-model head) and the (B, S) bool mask of real tokens."""

    logits: Tensor | None
    layers: list[LayerRouting]
    attention_mask: Tensor

    def expert_counts(self) -> Tensor:
        """(L, E) token slots each expert received, over real (unmasked) tokens."""
        n_experts = self.layers[0].probs.shape[-1]
        counts = []
        for layer in self.layers:
            chosen = layer.topk_idx[self.attention_mask]
            counts.append(torch.bincount(chosen.reshape(-1), minlength=n_experts))
        return torch.stack(counts)

    def routing(self) -> list[RoutingInfo]:
        """Every MoE layer's routing over the real tokens as a moealign layer reports it
        (:class:`~moealign.nn.moe.RoutingInfo`: expert counts, and the balance loss and
        z-loss of the captured ``probs`` and ``logits``, DESIGN.md §4), for
        :class:`~moealign.evaluation.routing_stats.RoutingStats`."""
        mask, n_experts = self.attention_mask, self.layers[0].probs.shape[-1]
        infos = []
        for layer, counts_E in zip(self.layers, self.expert_counts(), strict=True):
            probs_TE, logits_TE, topk_idx_TK = (
                t[mask] for t in (layer.probs, layer.logits, layer.topk_idx)
            )
            infos.append(
                RoutingInfo(
                    logits=logits_TE,
                    probs=probs_TE,
                    topk_idx=topk_idx_TK,
                    topk_weight=layer.topk_weight[mask],
                    keep=None,
                    expert_counts=counts_E,
                    load_balance_loss=load_balance_loss(probs_TE, topk_idx_TK, n_experts),
                    z_loss=z_loss(logits_TE),
                )
            )
        return infos


def _scores_and_probs(family: Family, logits: Tensor) -> tuple[Tensor, Tensor]:
    """The family's scores and routing distribution from router logits (..., E), in fp32 or
    wider: softmax (both), or sigmoid s and s / Σ_e s."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if family.scoring == SOFTMAX:
        scores = torch.softmax(logits, dim=-1)
        return scores, scores
    scores = torch.sigmoid(logits)
    return scores, scores / scores.sum(-1, keepdim=True)


def _layer_routing(
    family: Family, layer: int, output: tuple, batch_shape: torch.Size
) -> LayerRouting:
    logits, topk_weight, topk_idx = output
    logits_BSE = logits.reshape(*batch_shape, -1)
    scores_BSE, probs_BSE = _scores_and_probs(family, logits_BSE)
    if isinstance(output, GateOutput):
        probs_BSE = output.probs.reshape(*batch_shape, -1)
    return LayerRouting(
        layer=layer,
        logits=logits_BSE,
        scores=scores_BSE,
        probs=probs_BSE,
        topk_idx=topk_idx.reshape(*batch_shape, -1),
        topk_weight=topk_weight.reshape(*batch_shape, -1),
    )


@contextmanager
def _recording_gates(model: nn.Module) -> Iterator[list[list[tuple]]]:
    """Forward hooks on every ``mlp.gate``: yields one list per MoE block of its outputs."""
    records: list[list[tuple]] = []
    handles = []
    for block in moe_blocks(model):
        outputs: list[tuple] = []
        records.append(outputs)
        handles.append(
            block.mlp.gate.register_forward_hook(
                lambda module, args, output, sink=outputs: sink.append(output)
            )
        )
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def _as_batch(inputs: Tensor | Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None]:
    if isinstance(inputs, Tensor):
        return inputs, None
    if isinstance(inputs, Mapping) and "input_ids" in inputs:
        return inputs["input_ids"], inputs.get("attention_mask")
    raise ValueError(
        f"inputs={type(inputs).__name__} is not accepted; expected input_ids (B, S) or a "
        "mapping with 'input_ids' and optionally 'attention_mask' (a tokenizer's output)"
    )


def capture_routing(model: nn.Module, inputs: Tensor | Mapping[str, Tensor]) -> RoutingCapture:
    """Run ``model`` on ``inputs`` and record every MoE router's output through forward hooks.

    ``inputs``: input_ids (B, S) or a mapping with ``input_ids`` and ``attention_mask``. Runs
    in the caller's grad mode (wrap in ``torch.no_grad()`` for analysis; with grad on, the
    captured logits and probs are differentiable w.r.t. the router weights).
    """
    family = detect_family(model)
    input_ids, attention_mask = _as_batch(inputs)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}; expected (B, S)")
    with _recording_gates(model) as records:
        output = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    layers = []
    for block, outputs in zip(moe_blocks(model), records, strict=True):
        if len(outputs) != 1:
            raise ValueError(
                f"the router of layer {block.layer} ran {len(outputs)} times in one forward; "
                "expected once"
            )
        layers.append(_layer_routing(family, block.layer, outputs[0], input_ids.shape))
    mask = (
        torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask is None
        else attention_mask.bool()
    )
    return RoutingCapture(getattr(output, "logits", None), layers, mask)


# --- diagnostics --------------------------------------------------------------------------------


def projection_alignments(model: nn.Module) -> tuple[list[float], list[float]]:
    """(effective, raw) per MoE layer: the mean over experts of
    λ_e = ‖W_g[e] r_e‖ / (‖r_e‖ σ_max(W_g[e])) (DESIGN.md §3, MPI paper Eq. 11) with r_e the
    effective router row (:func:`router_rows`), and with r_e the stored row R (equal to the
    effective one except for a swapped-in MPI router)."""
    effective, raw = [], []
    with torch.no_grad():
        for block in moe_blocks(model):
            gate = block.mlp.gate
            w_gate_EFD = expert_matrix(block.mlp.experts, "gate")
            stored_ED = gate.router.weight if isinstance(gate, MoealignGate) else gate.weight
            for rows_ED, values in ((router_rows(gate), effective), (stored_ED, raw)):
                values.append(float(diagnostics.projection_alignment(rows_ED, w_gate_EFD).mean()))
    return effective, raw


def routing_rows(model: nn.Module, statistics: RoutingStats) -> list[dict]:
    """One row per MoE block (``layer`` = its decoder-layer index) of the statistics
    accumulated from captures of ``model`` (:meth:`RoutingSummary.layer_rows`: tokens, expert
    counts and utilisation, entropies, MaxVio, balance and z-loss), with the projection
    alignment of ``model``'s routers."""
    summary = statistics.summary()
    effective, raw = projection_alignments(model)
    summary.projection_alignment = torch.tensor(effective, dtype=torch.float64)
    summary.projection_alignment_raw = torch.tensor(raw, dtype=torch.float64)
    return summary.layer_rows([block.layer for block in moe_blocks(model)])


def routing_diagnostics(model: nn.Module, capture: RoutingCapture) -> list[dict]:
    """Per-layer routing diagnostics of one capture (:func:`routing_rows`)."""
    statistics = RoutingStats(len(capture.layers), capture.layers[0].probs.shape[-1])
    statistics.add(capture.routing())
    return routing_rows(model, statistics)


# --- RoutedModel view -----------------------------------------------------------------------


class _LayerOverride:
    """One MoE block's :data:`~moealign.nn.routed.ProbsOverride`, applied to its router's (T, E)
    routing distribution: a forward pre-hook on the block records the (B, S) of its input, so
    that the override sees (B, S, E) as the protocol says."""

    def __init__(self, index: int, override: ProbsOverride):
        self.index = index
        self.override = override
        self.batch_shape: torch.Size | None = None

    def record_batch_shape(self, module: nn.Module, args: tuple) -> None:
        self.batch_shape = args[0].shape[:-1]

    def __call__(self, probs_TE: Tensor) -> Tensor:
        probs_BSE = probs_TE.view(*self.batch_shape, probs_TE.shape[-1])
        new_BSE = self.override(probs_BSE)
        if not isinstance(new_BSE, Tensor) or new_BSE.shape != probs_BSE.shape:
            shape = tuple(new_BSE.shape) if isinstance(new_BSE, Tensor) else type(new_BSE).__name__
            raise ValueError(
                f"overrides[{self.index}] returned {shape}; expected a tensor of the routing "
                f"probabilities' shape {tuple(probs_BSE.shape)}"
            )
        return new_BSE.to(probs_TE.dtype).reshape(probs_TE.shape)


def _native_topk_weight(
    family: Family, gate: nn.Module, logits_TE: Tensor, probs_TE: Tensor, index_TK: Tensor
) -> Tensor:
    """The weights a native router hands to the experts ``index_TK`` when its routing
    distribution is ``probs_TE``: w = p_K, over Σ_K p when the router renormalises (Mixtral
    always, the others if ``norm_topk_prob``). DeepSeek-V3 (p = s / Σ_e s of its sigmoid scores
    s): w = γ · p_K / (Σ_K p + 1e-20) with norm_topk_prob (its router's own formula, which
    p = s/Σs leaves unchanged), else w = γ · (Σ_e s) · p_K (p redistributes the token's total
    sigmoid score), γ = routed_scaling_factor. At p = the router's own distribution both give
    its own weights for the same experts."""
    weight_TK = probs_TE.gather(-1, index_TK)
    if family.scoring == SOFTMAX:
        if _native_normalize_topk(gate):
            weight_TK = weight_TK / weight_TK.sum(-1, keepdim=True)
        return weight_TK
    if gate.norm_topk_prob:
        weight_TK = weight_TK / (weight_TK.sum(-1, keepdim=True) + 1e-20)
    else:
        weight_TK = weight_TK * torch.sigmoid(logits_TE.to(probs_TE.dtype)).sum(-1, keepdim=True)
    return weight_TK * gate.routed_scaling_factor


def _reroute_native_gate(
    family: Family, layer_override: _LayerOverride, gate: nn.Module, args: tuple, output: tuple
) -> GateOutput:
    """Forward hook on a native ``mlp.gate``: routes with ``layer_override(probs)`` instead of
    the router's distribution probs (see :meth:`HFRouted.override_routing`)."""
    logits_TE, weight_TK, index_TK = output
    _, probs_TE = _scores_and_probs(family, logits_TE)
    new_TE = layer_override(probs_TE)
    changed_T1 = (new_TE != probs_TE).any(-1, keepdim=True)
    new_index_TK = torch.topk(new_TE, index_TK.shape[-1], dim=-1).indices
    new_weight_TK = _native_topk_weight(family, gate, logits_TE, new_TE, new_index_TK)
    if family.scoring == SOFTMAX:  # softmax(logits) = the new distribution, as Router.reroute
        logits_TE = torch.where(changed_T1, new_TE.log().to(logits_TE.dtype), logits_TE)
    return GateOutput(
        logits_TE,
        torch.where(changed_T1, new_weight_TK.to(weight_TK.dtype), weight_TK),
        torch.where(changed_T1, new_index_TK.to(index_TK.dtype), index_TK),
        new_TE,
    )


class HFRouted:
    """:class:`~moealign.nn.routed.RoutedModel` view of a transformers MoE causal LM.

    ``forward`` returns the logits and each MoE layer's ``probs`` (B, S, E) (see
    :class:`LayerRouting`; differentiable w.r.t. the routers); ``router_parameters`` are the
    ``mlp.gate`` weights (the moealign router's parameters after :func:`swap_routers`);
    ``override_routing`` replaces chosen layers' routing distribution (C3PO, oracle routing).
    """

    def __init__(self, model: nn.Module):
        detect_family(model)
        self.model = model

    def n_moe_layers(self) -> int:
        return len(moe_blocks(self.model))

    def router_parameters(self, layers: list[int]) -> list[nn.Parameter]:
        blocks = moe_blocks(self.model)
        parameters = []
        for index in layers:
            if not 0 <= index < len(blocks):
                raise ValueError(
                    f"layers contains {index}; MoE layer indices run 0..{len(blocks) - 1}"
                )
            gate = blocks[index].mlp.gate
            owner = gate.router if isinstance(gate, MoealignGate) else gate
            parameters += list(owner.parameters())
        return parameters

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> RoutedOutput:
        capture = capture_routing(
            self.model, {"input_ids": input_ids, "attention_mask": attention_mask}
        )
        return RoutedOutput(capture.logits, [layer.probs for layer in capture.layers])

    @contextmanager
    def override_routing(self, overrides: Mapping[int, ProbsOverride]) -> Iterator[None]:
        """Within the context, MoE layer l routes with p' = ``overrides[l](p)`` (B, S, E) instead
        of its own distribution p (``probs``, :class:`LayerRouting`), to the contract of
        :meth:`moealign.nn.routed.RoutedModel.override_routing` (DESIGN.md §5: C3PO re-mixing and
        oracle routing change the routing distribution at the routed token).

        A token whose row p' leaves equal keeps the router's logits, top-k and weights bit for
        bit. A changed token t routes to K_t = top-K of p'_t (no selection bias, no group limit:
        the override decides) with the weights its family's router would derive from p'_t
        (:func:`_native_topk_weight`: p'_K renormalised over the K where the router
        renormalises; DeepSeek-V3 adds its routed_scaling_factor). The weights are
        differentiable in p', and ``forward`` reports p' as ``probs``. Native gates are
        rerouted by forward hooks (transformers' code is not touched); gates from
        :func:`swap_routers` by :meth:`Router.reroute`. Hooks and overrides are removed on
        leaving the context, also on error.
        """
        blocks = moe_blocks(self.model)
        check_override_layers(overrides, len(blocks))
        family = detect_family(self.model)
        handles, swapped = [], []
        try:
            for index, override in overrides.items():
                block = blocks[index]
                layer_override = _LayerOverride(index, override)
                handles.append(
                    block.mlp.register_forward_pre_hook(layer_override.record_batch_shape)
                )
                if isinstance(block.mlp.gate, MoealignGate):
                    block.mlp.gate.probs_override = layer_override
                    swapped.append(block.mlp.gate)
                else:
                    hook = partial(_reroute_native_gate, family, layer_override)
                    handles.append(block.mlp.gate.register_forward_hook(hook, prepend=True))
            yield
        finally:
            for handle in handles:
                handle.remove()
            for gate in swapped:
                gate.probs_override = None
