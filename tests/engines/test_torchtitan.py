"""torchtitan's MoE with moealign's MPI router (moealign.engines.torchtitan, DESIGN.md §10)
against moealign's own MoELayer and a float64 computation; precompute to the stock router."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("torchtitan")

from torchtitan.models.common.moe import MoE, TokenChoiceTopKRouter  # noqa: E402

from helpers_torchtitan import D, E, build, moe_config, moealign_twin  # noqa: E402
from moealign.alignment.guardrails import RoutingGuardrail  # noqa: E402
from moealign.alignment.loss import routing_alignment_loss  # noqa: E402
from moealign.alignment.term import RoutingAlignment, RoutingPrior  # noqa: E402
from moealign.config import GuardrailConfig  # noqa: E402
from moealign.engines.torchtitan import (  # noqa: E402
    AlignmentTerm,
    MPIGate,
    MPIMoE,
    RoutingRecorder,
    mpi_moe_config,
    precompute,
    router_grad_norms,
    routing_metrics,
    routing_summary,
)
from moealign.evaluation.routing_stats import RoutingStats  # noqa: E402
from moealign.optim.schedules import LambdaSchedule  # noqa: E402


def float64_logits(moe, x_TD, scale, steps=1):
    """Expert by expert from the torchtitan layer's own parameters: u = Aᵀ(A r), r' = u/‖u‖."""
    rows = moe.router.gate.weight.detach().double()
    w1 = moe.routed_experts.inner_experts.w1_EFD.detach().double()
    effective = []
    for e in range(E):
        r = rows[e]
        for _ in range(steps):
            r = w1[e].T @ (w1[e] @ r)
            r = r / r.norm()
        effective.append(r)
    return scale * x_TD.double() @ torch.stack(effective).T


def test_config_builds_torchtitans_moe_with_a_bound_mpi_gate():
    moe = build(mpi_moe_config(moe_config(), c_prime=2.0))
    assert isinstance(moe, MoE) and isinstance(moe, MPIMoE)
    assert type(moe.router) is TokenChoiceTopKRouter  # torchtitan's own router class
    assert isinstance(moe.router.gate, MPIGate) and moe.router.gate.weight.shape == (E, D)
    assert set(moe.state_dict()) == set(build(moe_config()).state_dict())  # same keys
    with pytest.raises(ValueError, match="power_steps"):
        mpi_moe_config(moe_config(), power_steps=0)
    with pytest.raises(ValueError, match="not accepted"):
        mpi_moe_config(moe_config(), c_primes=2.0)


@pytest.mark.parametrize("options,scale", [({}, 4 / math.sqrt(E)), ({"logit_scale": 0.125}, 0.125)])
def test_logits_equal_a_float64_computation_from_the_layers_parameters(options, scale):
    moe = build(mpi_moe_config(moe_config(), **options))
    x = torch.randn(2, 5, D)
    with RoutingRecorder(moe) as recorder:
        moe(x)
    expected = float64_logits(moe, x.reshape(-1, D), scale)
    torch.testing.assert_close(recorder.routing[0].logits.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options", [{"c_prime": 2.0}, {"power_steps": 3, "temperature": 0.7}])
def test_outputs_and_gradients_equal_moealigns_moe_layer(options):
    moe = build(mpi_moe_config(moe_config(), **options))
    layer = moealign_twin(moe, **options)
    x = torch.randn(3, 7, D)
    x_tt, x_ma = x.clone().requires_grad_(), x.clone().requires_grad_()
    with RoutingRecorder(moe) as recorder:
        y_tt = moe(x_tt)
    y_ma, info = layer(x_ma)
    routed = recorder.routing[0]
    assert torch.equal(routed.topk_idx.sort(-1).values, info.topk_idx.sort(-1).values)
    torch.testing.assert_close(routed.probs, info.probs)
    torch.testing.assert_close(y_tt, y_ma, rtol=1e-5, atol=1e-6)
    grad_out = torch.randn_like(y_tt)
    (y_tt * grad_out).sum().backward()
    (y_ma * grad_out).sum().backward()
    experts = moe.routed_experts.inner_experts
    pairs = [
        (moe.router.gate.weight.grad, layer.router.weight.grad),
        (experts.w1_EFD.grad, layer.experts.w_gate.grad),
        (experts.w3_EFD.grad, layer.experts.w_up.grad),
        (experts.w2_EDF.grad, layer.experts.w_down.grad),
        (x_tt.grad, x_ma.grad),
    ]
    for got, expected in pairs:
        assert expected.abs().sum() > 0
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_stock_bf16_experts_route_alike_and_agree_to_bf16():
    """torchtitan's own GroupedExperts round operands to bf16: routing is fp32 and identical."""
    moe = build(mpi_moe_config(moe_config(fp32_experts=False), c_prime=2.0))
    layer = moealign_twin(moe, c_prime=2.0)
    x = torch.randn(4, 8, D)
    with RoutingRecorder(moe) as recorder:
        y_tt = moe(x)
    y_ma, info = layer(x)
    assert torch.equal(recorder.routing[0].topk_idx.sort(-1).values, info.topk_idx.sort(-1).values)
    torch.testing.assert_close(y_tt, y_ma, rtol=0.05, atol=0.05)


def test_expert_bias_steers_selection_through_torchtitans_router():
    moe = build(mpi_moe_config(moe_config(expert_bias=True)))
    x = torch.randn(2, 6, D)
    with torch.no_grad():
        moe.expert_bias_E.copy_(torch.tensor([10.0, 10.0] + [0.0] * (E - 2)))
        with RoutingRecorder(moe) as recorder:
            moe(x)
    assert (recorder.routing[0].topk_idx.sort(-1).values == torch.tensor([0, 1])).all()
    assert moe.tokens_per_expert_E[:2].sum() == 2 * 12  # torchtitan's own count


def test_precompute_routes_every_token_as_the_mpi_router_and_loads_into_stock():
    mpi = build(mpi_moe_config(moe_config(expert_bias=True), c_prime=3.0, temperature=0.8))
    with torch.no_grad():
        mpi.expert_bias_E.uniform_(-0.05, 0.05)
    x = torch.randn(4, 9, D)
    with torch.no_grad():
        expected = mpi.router(x, mpi.expert_bias_E)
        precompute(mpi)
        assert type(mpi.router.gate).__name__ == "Linear"
        stock = build(moe_config(expert_bias=True), seed=1)  # torchtitan's unmodified MoE
        stock.load_state_dict(mpi.state_dict())
        got = stock.router(x, stock.expert_bias_E)
    assert torch.equal(got[1].sort(-1).values, expected[1].sort(-1).values)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[2], expected[2])


def test_alignment_term_statistics_and_guardrail_read_torchtitans_routing():
    """λ(t)·KL from the recorded full softmax, the statistics' names, the guardrail's action."""
    moe = build(mpi_moe_config(moe_config()))
    recorder = RoutingRecorder(moe)
    schedule = LambdaSchedule(kind="warmup", target=0.2, warmup_steps=4)
    alignment = RoutingAlignment(RoutingPrior("uniform", 1, E), schedule)
    guardrail = RoutingGuardrail(
        GuardrailConfig(policy="reduce_lambda", min_token_entropy=0.999, patience=1), E, alignment
    )
    term = AlignmentTerm(recorder, alignment, guardrail)
    x = torch.randn(2, 6, D)
    task_ids = torch.tensor([[0] * 6, [1] * 6])
    moe(x)
    loss = term(task_ids, step=2)
    probs = torch.softmax(moe.router.gate(x).reshape(-1, E).double(), -1)
    expected = 0.1 * routing_alignment_loss(
        [probs], task_ids.reshape(-1), torch.full((1, E), 1 / E)
    )
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-8)
    loss.backward()
    stats = RoutingStats(1, E, task_names=["a", "b"])
    stats.add(recorder.routing, task_ids)
    summary = routing_summary(stats, moe, grad_norms=router_grad_norms(moe))
    metrics = routing_metrics(summary)
    for name in ("max_vio", "max_vio_batch", "dead_experts", "usage_entropy", "token_entropy"):
        assert f"moe/{name}" in metrics and f"moe/layer0/{name}" in metrics
    assert metrics["moe/projection_alignment"] > metrics["moe/projection_alignment_raw"]
    assert metrics["moe/router_grad_norm"] > 0
    event = term.end_step(2, summary)  # token entropy < 0.999: unhealthy, λ halves
    assert event["action"] == "lambda scale -> 0.5" and alignment.weight(4) == pytest.approx(0.1)
    recorder.remove()
