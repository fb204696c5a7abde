"""The MPI router inside Megatron-Core's ``MoELayer`` (issue 22): against moealign's own
``MoELayer`` holding the same weights, against a float64 computation from the Megatron layer's
parameters, and the option checks."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("megatron.core")

from helpers_megatron import (  # noqa: E402
    D_MODEL,
    N_EXPERTS,
    TOP_K,
    expert_grads,
    megatron_moe_layer,
    megatron_parallel,
    tiny_config,
)
from moealign.engines.megatron import (  # noqa: E402
    MPITopKRouter,
    drive_matrix,
    mpi_router,
    to_moealign_layer,
)
from moealign.nn.routers import OptionError  # noqa: E402


@pytest.fixture(scope="module")
def parallel():
    with megatron_parallel():
        yield


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"power_steps": 3, "temperature": 0.7},
        {"expert_matrix": "down", "c_prime": 2.0},
        {"retract": False, "detach_experts": True},
        {"logit_scale": 0.125},
    ],
)
def test_megatron_layer_equals_moealign_layer(parallel, options):
    """Outputs, router gradients and expert gradients of Megatron's MoELayer with the MPI router
    equal those of moealign's MoELayer (router ``mpi``, the same options) holding its weights
    (read by ``to_moealign_layer``), fp32."""
    torch.manual_seed(0)
    layer = megatron_moe_layer(tiny_config(), mpi_router(**options))
    twin = to_moealign_layer(layer)
    expected = {name: value for name, value in options.items() if name != "logit_scale"}
    assert twin.router.kind == "mpi" and expected.items() <= twin.router.options().items()
    assert math.isclose(twin.router.scale / twin.router.temperature, layer.router.scale)
    x = torch.randn(6, 3, D_MODEL)
    y, _ = layer(x)
    y_twin, info = twin(x.reshape(-1, D_MODEL))
    torch.testing.assert_close(y.reshape(-1, D_MODEL), y_twin, rtol=1e-5, atol=1e-6)
    probs, routing_map = layer.router(x)
    chosen_TK = routing_map.float().topk(TOP_K, dim=-1).indices.sort(-1).values
    assert torch.equal(chosen_TK, info.topk_idx.sort(-1).values)
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    (y_twin * upstream.reshape(-1, D_MODEL)).sum().backward()
    torch.testing.assert_close(layer.router.weight.grad, twin.router.weight.grad)
    for name, grad in expert_grads(layer).items():
        torch.testing.assert_close(grad, getattr(twin.experts, name).grad, rtol=1e-5, atol=1e-6)
    assert layer.router.weight.grad.abs().sum() > 0


def test_logits_equal_float64_computation(parallel):
    """logits_te = s·⟨x_t, u_e/‖u_e‖⟩ with u_e = W_gᵀW_g r_e from the Megatron layer's own
    parameters in float64 (the gate = first half of linear_fc1); also with the authors' fixed
    scale 0.125."""
    torch.manual_seed(1)
    for options, scale in (({}, 4.0 / math.sqrt(N_EXPERTS)), ({"logit_scale": 0.125}, 0.125)):
        layer = megatron_moe_layer(tiny_config(), mpi_router(**options))
        x = torch.randn(5, 2, D_MODEL)
        logits = layer.router.gating(x).reshape(-1, N_EXPERTS)
        rows = layer.router.weight.double()
        expected = torch.empty(10, N_EXPERTS, dtype=torch.float64)
        for e, expert in enumerate(layer.experts.local_experts):
            gate = expert.linear_fc1.weight.double()[: expert.linear_fc1.weight.shape[0] // 2]
            u = gate.T @ (gate @ rows[e])
            expected[:, e] = scale * (x.reshape(-1, D_MODEL).double() @ (u / u.norm()))
        torch.testing.assert_close(logits.double(), expected, rtol=1e-5, atol=1e-6)


def test_megatron_aux_losses_reach_the_router(parallel):
    """Megatron's own balance loss and z-loss (through its aux-loss autoscaler) give the MPI
    router's R and the experts' gate matrices gradients, with no output gradient at all."""
    torch.manual_seed(2)
    config = tiny_config(moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3)
    layer = megatron_moe_layer(config, mpi_router())
    y, _ = layer(torch.randn(4, 2, D_MODEL))
    (0.0 * y).sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0
    assert layer.experts.local_experts[0].linear_fc1.weight.grad.abs().sum() > 0


def test_options_are_checked(parallel):
    with pytest.raises(OptionError, match="power_steps"):
        mpi_router(power_steps=0)
    with pytest.raises(OptionError, match="expert_matrix"):
        mpi_router(expert_matrix="gates")
    with pytest.raises(OptionError, match="colour"):
        mpi_router(colour=1)
    router = MPITopKRouter(tiny_config())
    with pytest.raises(RuntimeError, match="bind_experts"):
        router(torch.randn(2, 1, D_MODEL))


def test_drive_matrix_layouts(parallel):
    """The gate/up halves and the transposed down matrix of SequentialMLP experts."""
    layer = megatron_moe_layer(tiny_config(), mpi_router())
    fc1 = layer.experts.local_experts[1].linear_fc1.weight
    fc2 = layer.experts.local_experts[1].linear_fc2.weight
    assert torch.equal(drive_matrix(layer.experts, "gate")[1], fc1[: fc1.shape[0] // 2])
    assert torch.equal(drive_matrix(layer.experts, "up")[1], fc1[fc1.shape[0] // 2 :])
    assert torch.equal(drive_matrix(layer.experts, "down")[1], fc2.T)
