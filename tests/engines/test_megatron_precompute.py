"""Precompute for Megatron-Core (issue 22): Megatron's unmodified ``TopKRouter`` holding R_eff
routes every token as the MPI router did and gives the same layer output."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron.core.transformer.moe import moe_utils  # noqa: E402
from megatron.core.transformer.moe.router import TopKRouter  # noqa: E402

from helpers_megatron import D_MODEL, megatron_moe_layer, megatron_parallel, tiny_config  # noqa: E402
from moealign.engines.megatron import (  # noqa: E402
    MPITopKRouter,
    mpi_router,
    precompute,
    to_moealign_layer,
)


@pytest.fixture
def stock_router_on_cpu(monkeypatch):
    """Megatron 0.16.1's ``TopKRouter.gating`` moves its weight to torch.cuda.current_device()
    and, without Transformer Engine, reads an undefined ``te_general_gemm``: point the first at
    the CPU and define the second as the None its import fallback means, so that the stock
    router's own code runs here unmodified."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    monkeypatch.setattr(moe_utils, "te_general_gemm", None, raising=False)


@pytest.mark.parametrize("options", [{}, {"power_steps": 2, "temperature": 0.5}])
def test_stock_topk_router_with_r_eff_routes_as_mpi(stock_router_on_cpu, options):
    with megatron_parallel():
        torch.manual_seed(4)
        config = tiny_config(moe_router_pre_softmax=bool(options))
        layer = megatron_moe_layer(config, mpi_router(**options))
        layer.eval()
        x = torch.randn(16, 4, D_MODEL)
        with torch.no_grad():
            probs, routing_map = layer.router(x)
            y, _ = layer(x)
            r_eff = layer.router.effective_weight()
        assert precompute(layer) == 1
        assert type(layer.router) is TopKRouter and not isinstance(layer.router, MPITopKRouter)
        assert torch.equal(layer.router.weight, r_eff)
        assert set(layer.router.state_dict()) == {"weight"}
        with torch.no_grad():
            stock_probs, stock_map = layer.router(x)
            stock_y, _ = layer(x)
        assert torch.equal(stock_map, routing_map)  # every token, every expert
        assert torch.equal(stock_probs, probs)
        assert torch.equal(stock_y, y)
        # read into moealign: a softmax_topk router with R_eff, the same experts per token
        twin = to_moealign_layer(layer)
        assert twin.router.kind == "softmax_topk"
        _, info = twin(x.reshape(-1, D_MODEL))
        chosen = torch.zeros_like(routing_map).scatter(1, info.topk_idx, True)
        assert torch.equal(chosen, routing_map)
