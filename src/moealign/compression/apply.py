"""Write compression plans back: a new model of E′ experts per MoE layer, built from its own
config, holding the compressed weights.

The compressed model is never patched in place: it is constructed from a config that says E′
and loads a state dict in which each MoE layer's expert tensors are the plan's and its router
is updated by the mapping of :func:`router_mapping` (:mod:`moealign.compression.plan`):

* pruning (R1): ``n_experts = E′`` and the kept rows;
* merging a moealign model (R2): ``n_experts = E`` router rows kept, ``merged_experts = E′``
  and each layer's ``expert_map`` (row → merged expert);
* merging a transformers model (R3): ``num_experts``/``num_local_experts = E′`` and the
  collapsed rows (the transformers config has one router row per expert).
 So the result is an ordinary model: it trains, evaluates,
checkpoints, resumes, exports and (transformers) saves and reloads like any other. Everything
outside the routed experts and their router rows (attention, embeddings, norms, shared
experts) is copied unchanged.

MPI routers (DESIGN.md §3) keep R and compute logits C · ⟨x, normalize(A_eᵀA_e r_e)⟩ with
C = c′/√E. Slicing R and the experts (R1) keeps each kept expert's r'_e, but C would grow with
the smaller E; so c′ becomes c′·√(E′/E) and C, hence every kept expert's logit, is unchanged.
Under R2 the E rows and C stay; row e's power step is driven by its merged expert's matrix
(A_{map[e]}), so its logit changes with the merged weights as the experts' outputs do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from moealign.compression.layers import MoELayerView, is_hf_model
from moealign.compression.plan import LayerPlan
from moealign.nn.moe import MoELayer
from moealign.nn.routers import MPIRouter
from moealign.nn.transformer import ModelConfig, MoETransformer

R1, R2, R3 = "R1 slice", "R2 share", "R3 collapse"


def router_mapping(model: nn.Module, plans: Sequence[LayerPlan], collapse: bool = False) -> str:
    """R1 for pruning plans; for merging, R2 on moealign models and R3 on transformers models
    (whose config cannot express R2) or where ``collapse`` asks for it (a moealign model
    meant for a Mixtral export, or a comparison of the two mappings)."""
    if not any(plan.merges for plan in plans):
        return R1
    return R3 if collapse or is_hf_model(model) else R2


def _moealign_layer_state(view: MoELayerView, plan: LayerPlan, mapping: str) -> dict[str, Tensor]:
    layer: MoELayer = view.module
    state = {
        "experts.w_gate": plan.experts.gate,
        "experts.w_up": plan.experts.up,
        "experts.w_down": plan.experts.down,
    }
    bias = layer.router.expert_bias
    if mapping == R2:
        state["expert_map"] = plan.expert_map(view.n_experts)
        return state  # the router (its rows, its bias) is the original's
    state["router.weight"] = plan.collapse_rows(layer.router.weight.detach())
    if bias is not None:
        state["router.expert_bias"] = plan.collapse_rows(bias)
    return state


def _hf_layer_state(view: MoELayerView, plan: LayerPlan, mapping: str) -> dict[str, Tensor]:
    mlp = view.module
    return {
        "experts.gate_up_proj": torch.cat([plan.experts.gate, plan.experts.up], dim=1),
        "experts.down_proj": plan.experts.down,
        "gate.weight": plan.collapse_rows(mlp.gate.weight.detach()),
    }


def compressed_state(
    model: nn.Module,
    views: Sequence[MoELayerView],
    plans: Sequence[LayerPlan],
    collapse: bool = False,
) -> dict[str, Tensor]:
    """``model.state_dict()`` with every MoE layer's experts and router updated
    (:func:`router_mapping`)."""
    mapping = router_mapping(model, plans, collapse)
    names = {id(module): name for name, module in model.named_modules()}
    state = dict(model.state_dict())
    for view, plan in zip(views, plans, strict=True):
        prefix = names[id(view.module)]
        prefix = f"{prefix}." if prefix else ""
        layout = _moealign_layer_state if isinstance(view.module, MoELayer) else _hf_layer_state
        for key, value in layout(view, plan, mapping).items():
            dtype = state[prefix + key].dtype if prefix + key in state else value.dtype
            state[prefix + key] = value.detach().to(dtype)
    return state


def mpi_c_prime(router: MPIRouter, n_experts: int) -> float:
    """c′·√(E′/E): the c′ that keeps C = c′/√E when the router has E′ rows."""
    return router.c_prime * math.sqrt(n_experts / router.n_experts)


def _router_options(layer: MoELayer, n_experts: int) -> dict:
    options = layer.router.options()
    if isinstance(layer.router, MPIRouter):
        options["c_prime"] = mpi_c_prime(layer.router, n_experts)
    return options


def _new_moe_layer(layer: MoELayer, n_experts: int, mapping: str) -> MoELayer:
    shared = layer.shared_expert
    rows = layer.n_experts if mapping == R2 else n_experts
    return MoELayer(
        layer.d_model,
        layer.experts.d_ff,
        rows,
        layer.top_k,
        router=layer.router.kind,
        balance_scope=layer.balance_scope,
        experts_implementation=layer.experts.implementation,
        shared_d_ff=None if shared is None else shared.w_gate.out_features,
        merged_experts=n_experts if mapping == R2 else None,
        **_router_options(layer, rows),
    )


def compressed_model_config(
    model: MoETransformer, n_experts: int, mapping: str = R1
) -> ModelConfig:
    """``model.config`` for E′ = ``n_experts``: under R1 ``n_experts`` router rows and experts
    (for MPI routers the c′ that keeps C = c′/√E); under R2 the E rows kept and
    ``merged_experts`` = E′."""
    config = model.config
    if mapping == R2:
        return replace(config, merged_experts=n_experts).validate()
    options = dict(config.router_options)
    first = model.moe_layers[0]
    if isinstance(first.router, MPIRouter):
        options["c_prime"] = mpi_c_prime(first.router, n_experts)
    return replace(config, n_experts=n_experts, router_options=options).validate()


def _new_hf_model(model: nn.Module, n_experts: int) -> nn.Module:
    from transformers import AutoModelForCausalLM

    config = type(model.config).from_dict(model.config.to_dict())
    config.num_experts = n_experts  # an alias of num_local_experts in Mixtral and Qwen3-MoE
    # Built in the model's dtype as from_pretrained would (buffers such as rotary frequencies
    # keep their own dtype).
    new = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    new.generation_config = model.generation_config
    return new


def build_compressed(
    model: nn.Module,
    views: Sequence[MoELayerView],
    plans: Sequence[LayerPlan],
    collapse: bool = False,
) -> nn.Module:
    """The compressed model (module docstring): same class, E′ experts per MoE layer (router
    rows by :func:`router_mapping`), on the
    model's device and dtype, in the model's train/eval mode. The global RNG is left as it
    was (building a model draws initial weights that are then overwritten)."""
    sizes = {plan.n_experts for plan in plans}
    if len(sizes) != 1:
        raise ValueError(f"plans give {sorted(sizes)} experts; every layer must keep the same E′")
    (n_experts,) = sizes
    mapping = router_mapping(model, plans, collapse)
    parameter = next(model.parameters())
    with torch.random.fork_rng(devices=[]):
        if is_hf_model(model):
            new = _new_hf_model(model, n_experts)
        elif isinstance(model, (MoELayer, MoETransformer)):
            new = (
                _new_moe_layer(model, n_experts, mapping)
                if isinstance(model, MoELayer)
                else MoETransformer(compressed_model_config(model, n_experts, mapping))
            ).to(dtype=parameter.dtype)
        else:
            raise ValueError(
                f"model={type(model).__name__} is not accepted; expected a MoETransformer, a "
                "MoELayer or a transformers MoE model"
            )
    new = new.to(device=parameter.device)
    new.load_state_dict(compressed_state(model, views, plans, collapse), strict=True)
    return new.train(model.training)
