"""Tiny torchtitan MoE layers and their moealign twins for the torchtitan engine tests."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torchtitan.models.common.config_utils import (
    make_moe_config,
    make_routed_experts_config,
    make_router_config,
)
from torchtitan.models.common.moe import GroupedExperts

from moealign.nn.moe import MoELayer

D, FF, E, K = 16, 24, 8, 2
INIT = {"weight": lambda w: torch.nn.init.normal_(w, std=0.3)}
EXPERT_INIT = {name: INIT["weight"] for name in ("w1_EFD", "w2_EDF", "w3_EFD")}


class Float32GroupedExperts(GroupedExperts):
    """torchtitan's ``GroupedExperts`` with its three grouped matmuls (its own ``_grouped_mm``)
    in the parameters' dtype instead of bf16: the same SwiGLU, so that its layer can be compared
    with moealign's at fp32 tolerance (the stock class rounds every operand to bf16)."""

    @dataclasses.dataclass(kw_only=True, slots=True)
    class Config(GroupedExperts.Config):
        pass

    def forward(self, x_RD, num_tokens_per_expert_E):
        w1, w2, w3 = (_local(w) for w in (self.w1_EFD, self.w2_EDF, self.w3_EFD))
        offsets_E = torch.cumsum(num_tokens_per_expert_E, dim=0, dtype=torch.int32)
        gate_RF = self._grouped_mm(A=x_RD, B_t=w1.transpose(-2, -1), offs=offsets_E)
        up_RF = self._grouped_mm(A=x_RD, B_t=w3.transpose(-2, -1), offs=offsets_E)
        hidden_RF = F.silu(gate_RF) * up_RF
        return self._grouped_mm(A=hidden_RF, B_t=w2.transpose(-2, -1), offs=offsets_E)


def _local(weight):
    """The local shard of an expert-parallel (DTensor) weight, as torchtitan's experts take."""
    return weight.to_local() if isinstance(weight, DTensor) else weight


def moe_config(*, fp32_experts: bool = True, expert_bias: bool = False, score_func="softmax"):
    """A stock torchtitan ``MoE.Config``: softmax scores renormalised over the top-K (moealign's
    ``normalize_topk``), no shared expert."""
    router = make_router_config(
        dim=D,
        num_experts=E,
        gate_param_init=INIT,
        top_k=K,
        score_func=score_func,
        route_norm=True,
    )
    routed = make_routed_experts_config(
        dim=D,
        hidden_dim=FF,
        num_experts=E,
        top_k=K,
        param_init=EXPERT_INIT,
        comm_backend="standard",
    )
    if fp32_experts:
        inner = routed.inner_experts
        routed = dataclasses.replace(
            routed,
            inner_experts=Float32GroupedExperts.Config(
                dim=inner.dim,
                hidden_dim=inner.hidden_dim,
                num_experts=inner.num_experts,
                param_init=inner.param_init,
            ),
        )
    return make_moe_config(
        num_experts=E,
        router=router,
        routed_experts=routed,
        load_balance_coeff=1e-3 if expert_bias else None,
    )


def build(config, seed: int = 0):
    torch.manual_seed(seed)
    moe = config.build()
    moe.init_states()
    return moe


def moealign_twin(moe, **router_options) -> MoELayer:
    """moealign's ``MoELayer`` (router ``mpi``) holding the torchtitan layer's weights."""
    layer = MoELayer(D, FF, E, K, router="mpi", **router_options)
    experts = moe.routed_experts.inner_experts
    with torch.no_grad():
        layer.router.weight.copy_(moe.router.gate.weight)
        layer.experts.w_gate.copy_(experts.w1_EFD)
        layer.experts.w_up.copy_(experts.w3_EFD)
        layer.experts.w_down.copy_(experts.w2_EDF)
    return layer
