"""One read-only view over the MoE layers that compression works on (DESIGN.md §2).

A :class:`MoELayerView` gives what every method needs from one MoE layer, whatever the model:
its expert weights in the fused SwiGLU layout (``gate``/``up`` (E, F, D), ``down`` (E, D, F)),
the expert activation, the raw router rows (E, D), and the layer's own routing of a batch of
inputs (logits after temperature, the model's own top-k). :func:`moe_layer_views` finds the
views of a :class:`~moealign.nn.MoETransformer`, a single :class:`~moealign.nn.MoELayer` or a
Hugging Face MoE model of a softmax family (through :mod:`moealign.integrations.hf`).

Compression reads through these views only; writing the compressed layers back is
:mod:`moealign.compression.apply`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moealign.integrations.hf import (
    SOFTMAX,
    MoealignGate,
    _native_normalize_topk,
    detect_family,
    expert_matrix,
    moe_blocks,
)
from moealign.nn.moe import MoELayer
from moealign.nn.routers import HierarchicalRouter, MPIRouter


class CompressionError(ValueError):
    """A compression request that cannot be carried out: the message names the argument or
    the model property and what is accepted."""


class ExpertWeights(NamedTuple):
    """E SwiGLU experts: y = down[e] (act(gate[e] x) ⊙ up[e] x) (DESIGN.md §2)."""

    gate: Tensor  # (E, F, D)
    up: Tensor  # (E, F, D)
    down: Tensor  # (E, D, F)

    def expert(self, e: int) -> ExpertWeights:
        """Expert e alone, as (F, D), (F, D), (D, F) matrices."""
        return ExpertWeights(*(w[e] for w in self))


@dataclass
class MoELayerView:
    """What compression reads from one MoE layer.

    ``module`` receives the layer's input as its first forward argument (calibration hooks it);
    ``top_k`` and ``normalize_topk`` (renormalise the top-k weights) describe the routing;
    ``selection_bias`` (E,) is added to the logits for the top-k choice only (moealign's
    aux-loss-free expert bias), None when absent. ``route(x_TD)`` returns the layer's router
    logits (T, E; fp32, after temperature; MPI: C · ⟨x, r'_e⟩, DESIGN.md §3) and its own top-k
    indices (T, K). ``activation`` is the experts' SwiGLU activation. ``capacity_factor``: the
    router's token-dropping capacity (None: dropless; transformers routers are dropless).
    """

    name: str
    module: nn.Module
    weights: ExpertWeights
    router_rows: Tensor  # (E, D) the raw router parameter (R for MPI)
    top_k: int
    normalize_topk: bool
    selection_bias: Tensor | None
    activation: Callable[[Tensor], Tensor]
    route: Callable[[Tensor], tuple[Tensor, Tensor]]
    capacity_factor: float | None = None

    @property
    def n_experts(self) -> int:
        return self.weights.gate.shape[0]


def _moealign_view(name: str, layer: MoELayer) -> MoELayerView:
    router = layer.router
    if isinstance(router, HierarchicalRouter):
        raise CompressionError(
            f"{name}: router kind 'hierarchical' cannot be compressed (its experts live in "
            "fixed groups with a group router); accepted router kinds: softmax_topk, switch, mpi"
        )
    if layer.expert_map is not None:
        raise CompressionError(
            f"{name}: the layer is already merged (model.merged_experts="
            f"{layer.experts.n_experts}, R2); compress the model it was merged from instead"
        )

    def route(x_TD: Tensor) -> tuple[Tensor, Tensor]:
        drive = layer.router_drive_matrix() if isinstance(router, MPIRouter) else None
        routed = router(x_TD, drive)
        return routed.logits.float(), routed.topk_idx

    experts = layer.experts
    return MoELayerView(
        name=name,
        module=layer,
        weights=ExpertWeights(experts.w_gate, experts.w_up, experts.w_down),
        router_rows=router.weight,
        top_k=router.top_k,
        normalize_topk=router.normalize_topk,
        selection_bias=router.expert_bias,
        activation=F.silu,
        route=route,
        capacity_factor=router.capacity_factor,
    )


def _hf_view(name: str, mlp: nn.Module) -> MoELayerView:
    gate, experts = mlp.gate, mlp.experts
    if isinstance(gate, MoealignGate):
        raise CompressionError(
            f"{name}: holds a swapped moealign router; compress the model with its native "
            "routers (export it with moealign.integrations.hf_export.export_pretrained and "
            "load it again)"
        )

    def route(x_TD: Tensor) -> tuple[Tensor, Tensor]:
        logits_TE, _, index_TK = gate(x_TD.to(gate.weight.dtype))
        return logits_TE.float(), index_TK

    return MoELayerView(
        name=name,
        module=mlp,
        weights=ExpertWeights(
            expert_matrix(experts, "gate"), expert_matrix(experts, "up"), experts.down_proj
        ),
        router_rows=gate.weight,
        top_k=gate.top_k,
        normalize_topk=_native_normalize_topk(gate),
        selection_bias=None,
        activation=experts.act_fn,
        route=route,
    )


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers model (it has a transformers ``config``)."""
    return hasattr(getattr(model, "config", None), "model_type")


def moe_layer_views(model: nn.Module) -> list[MoELayerView]:
    """The views of every MoE layer of ``model`` in depth order: a moealign model or layer, or
    a transformers MoE model of a softmax family (mixtral, olmoe, qwen2_moe, qwen3_moe)."""
    if isinstance(model, MoELayer):
        return [_moealign_view("moe layer", model)]
    if is_hf_model(model):
        family = detect_family(model)
        if family.scoring != SOFTMAX:
            raise CompressionError(
                f"model_type={family.name!r} ({family.description}) is not accepted: the "
                "compression methods route with a softmax top-k router; accepted families: "
                "mixtral, olmoe, qwen2_moe, qwen3_moe"
            )
        return [_hf_view(f"layer {block.layer}", block.mlp) for block in moe_blocks(model)]
    layers = [
        (name, module) for name, module in model.named_modules() if isinstance(module, MoELayer)
    ]
    if not layers:
        raise CompressionError(
            f"model={type(model).__name__} has no MoE layer; accepted: a MoETransformer with "
            "model.ffn='moe', a MoELayer, or a Hugging Face MoE model"
        )
    return [_moealign_view(name, layer) for name, layer in layers]


def expert_outputs(weights: ExpertWeights, activation: Callable, x_TD: Tensor) -> Tensor:
    """E_e(x_t) for every expert e and token t, (E, T, D): one batched matmul per weight, all
    experts on all tokens (calibration statistics, research-compression.md §0)."""
    dtype = torch.promote_types(x_TD.dtype, torch.float32)
    x_1TD = x_TD.to(dtype).unsqueeze(0)
    gate_ETF = x_1TD @ weights.gate.to(dtype).transpose(1, 2)
    up_ETF = x_1TD @ weights.up.to(dtype).transpose(1, 2)
    return (activation(gate_ETF) * up_ETF) @ weights.down.to(dtype).transpose(1, 2)
