"""Megatron-Core on the CPU for the engine tests: a gloo process group with Megatron's parallel
state, tiny ``TransformerConfig``s, a ``MoELayer`` with a given router and moealign's
``MoELayer`` holding the same weights."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.transformer.moe.moe_layer import MoELayer as MegatronMoELayer
from megatron.core.transformer.transformer_config import TransformerConfig

from moealign.distributed.context import free_port
from moealign.engines.megatron import bind_experts

D_MODEL, D_FF, N_EXPERTS, TOP_K = 16, 8, 4, 2


@contextlib.contextmanager
def megatron_parallel(ep_size: int = 1, etp_size: int = 1) -> Iterator[None]:
    """Megatron's parallel state (expert parallel ``ep_size``, expert tensor parallel
    ``etp_size``) over a gloo group (one process unless the caller already initialised one,
    e.g. a spawned rank), torn down afterwards."""
    owns_group = not dist.is_initialized()
    if owns_group:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(
        expert_model_parallel_size=ep_size, expert_tensor_parallel_size=etp_size
    )
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if owns_group:
            dist.destroy_process_group()


def tiny_config(**overrides) -> TransformerConfig:
    """A one-layer MoE config on the CPU: SwiGLU experts, ``allgather`` dispatcher, fp32."""
    options = dict(
        num_layers=1,
        hidden_size=D_MODEL,
        num_attention_heads=2,
        ffn_hidden_size=D_FF,
        moe_ffn_hidden_size=D_FF,
        num_moe_experts=N_EXPERTS,
        moe_router_topk=TOP_K,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        moe_token_dispatcher_type="allgather",
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=0.0,
        moe_z_loss_coeff=None,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
    )
    return TransformerConfig(**(options | overrides))


def megatron_moe_layer(config: TransformerConfig, router) -> MegatronMoELayer:
    """Megatron's ``MoELayer`` (``SequentialMLP`` experts) with ``router`` as its router
    builder, layer number 1, experts bound to MPI routers."""
    spec = get_moe_module_spec(use_te=False, num_experts=config.num_moe_experts)
    spec.submodules.router = router
    layer = MegatronMoELayer(config, spec.submodules, layer_number=1)
    layer.set_layer_number(1)
    bind_experts(layer)
    return layer


def expert_grads(layer: MegatronMoELayer) -> dict[str, torch.Tensor]:
    """Megatron's expert gradients in moealign's layout: w_gate, w_up (E, F, D), w_down
    (E, D, F)."""
    experts = layer.experts.local_experts
    fc1 = torch.stack([expert.linear_fc1.weight.grad for expert in experts])
    gate, up = fc1.chunk(2, dim=1)
    down = torch.stack([expert.linear_fc2.weight.grad for expert in experts])
    return {"w_gate": gate, "w_up": up, "w_down": down}
