"""Tiny torchtitan MoE layers and their moealign twins for the torchtitan engine tests."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torchtitan.models.common.moe import GroupedExperts

from moealign.engines.torchtitan import moe_weights, softmax_moe_config, to_moe_layer
from moealign.nn.moe import MoELayer

D, FF, E, K = 16, 24, 8, 2
EXAMPLE = Path(__file__).parents[1] / "examples" / "torchtitan_mpi.py"


def load_example():
    """examples/torchtitan_mpi.py as a module (its tiny Qwen3 MoE, ``train`` and ``export``)."""
    spec = importlib.util.spec_from_file_location("torchtitan_mpi_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def init_weight(weight):
    return torch.nn.init.normal_(weight, std=0.3)


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


def moe_config(*, fp32_experts: bool = True, expert_bias: bool = False):
    """A stock torchtitan ``MoE.Config`` routed as moealign's ``MoELayer``; with
    ``fp32_experts`` its experts compute in fp32 (:class:`Float32GroupedExperts`)."""
    config = softmax_moe_config(
        D, FF, E, K, param_init=init_weight, load_balance_coeff=1e-3 if expert_bias else None
    )
    return with_fp32_experts(config) if fp32_experts else config


def with_fp32_experts(config):
    """The ``MoE.Config`` ``config`` (any subclass) with :class:`Float32GroupedExperts`."""
    inner = config.routed_experts.inner_experts
    fp32 = Float32GroupedExperts.Config(
        dim=inner.dim,
        hidden_dim=inner.hidden_dim,
        num_experts=inner.num_experts,
        param_init=inner.param_init,
    )
    routed = dataclasses.replace(config.routed_experts, inner_experts=fp32)
    return dataclasses.replace(config, routed_experts=routed)


def build(config, seed: int = 0):
    torch.manual_seed(seed)
    moe = config.build()
    moe.init_states()
    return moe


def moealign_twin(moe, **router_options) -> MoELayer:
    """moealign's ``MoELayer`` (router ``mpi``) holding the torchtitan layer's weights."""
    return to_moe_layer(moe_weights(moe), K, "mpi", **router_options)
