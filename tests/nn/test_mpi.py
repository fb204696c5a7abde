"""MPI router (DESIGN.md §3) against a float64 reference; ablation flags; precompute."""

import math

import pytest
import torch

from moealign.evaluation.diagnostics import projection_alignment
from moealign.nn import MoELayer, MPIRouter, SoftmaxTopKRouter, precompute_routers


def reference_logits(
    x, router_rows, matrices, c_prime, n_experts, steps=1, retract=True, power=True
):
    """Float64, expert by expert: u = Aᵀ(A r) (steps times), r' = u/‖u‖, logits = C x·r'."""
    x, rows, matrices = x.double(), router_rows.detach().double(), matrices.detach().double()
    effective = []
    for e in range(n_experts):
        r = rows[e]
        if power:
            for _ in range(steps):
                r = matrices[e].T @ (matrices[e] @ r)
                if retract:
                    r = r / r.norm()
        if retract:
            r = r / r.norm()
        effective.append(r)
    return (c_prime / math.sqrt(n_experts)) * x @ torch.stack(effective).T


def make_layer(**options):
    torch.manual_seed(0)
    return MoELayer(16, 24, 8, 2, router="mpi", **options)


def test_logits_match_float64_reference():
    layer = make_layer(c_prime=4.0)
    x = torch.randn(3, 7, 16)
    _, info = layer(x)
    expected = reference_logits(
        x.reshape(-1, 16), layer.router.weight, layer.experts.w_gate, 4.0, 8
    )
    torch.testing.assert_close(info.logits.double(), expected, rtol=1e-5, atol=1e-6)
    assert layer.router.scale == pytest.approx(4.0 / math.sqrt(8))  # C = C'/√E, not C'·√E


@pytest.mark.parametrize(
    "options,reference_options",
    [
        (dict(power_steps=10), dict(steps=10)),
        (dict(power=False), dict(power=False)),
        (dict(retract=False), dict(retract=False)),
        (dict(retract=False, power_steps=3), dict(retract=False, steps=3)),
    ],
)
def test_ablation_flags_change_exactly_what_they_name(options, reference_options):
    layer = make_layer(**options)
    x = torch.randn(10, 16)
    _, info = layer(x)
    expected = reference_logits(
        x, layer.router.weight, layer.experts.w_gate, 4.0, 8, **reference_options
    )
    torch.testing.assert_close(info.logits.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("matrix", ["gate", "up", "down"])
def test_expert_matrix_choice(matrix):
    layer = make_layer(expert_matrix=matrix)
    drive = {
        "gate": layer.experts.w_gate,
        "up": layer.experts.w_up,
        "down": layer.experts.w_down.transpose(1, 2),
    }[matrix]
    x = torch.randn(6, 16)
    _, info = layer(x)
    torch.testing.assert_close(
        info.logits.double(),
        reference_logits(x, layer.router.weight, drive, 4.0, 8),
        rtol=1e-5,
        atol=1e-6,
    )
    layer.zero_grad()
    (info.logits.square().sum()).backward()
    grads = {name: getattr(layer.experts, f"w_{name}").grad for name in ("gate", "up", "down")}
    assert grads[matrix].abs().sum() > 0
    for other in set(grads) - {matrix}:
        assert grads[other] is None or grads[other].abs().sum() == 0


def test_gradient_reaches_expert_gate_through_router_and_balance_loss():
    layer = make_layer()
    x = torch.randn(12, 16)
    _, info = layer(x)
    info.load_balance_loss.backward()
    assert layer.experts.w_gate.grad.abs().sum() > 0
    assert layer.router.weight.grad.abs().sum() > 0
    assert layer.experts.w_up.grad is None  # the balance loss does not touch the experts' outputs


def test_detach_experts_stops_only_the_expert_gradient():
    layer = make_layer(detach_experts=True)
    _, info = layer(torch.randn(12, 16))
    info.load_balance_loss.backward()
    assert layer.experts.w_gate.grad is None
    assert layer.router.weight.grad.abs().sum() > 0


def test_router_parameter_is_never_overwritten():
    layer = make_layer()
    before = layer.router.weight.detach().clone()
    layer(torch.randn(5, 16))
    assert torch.equal(layer.router.weight, before)


def test_gradient_matches_finite_differences_in_float64():
    layer = make_layer().double()
    x = torch.randn(4, 16, dtype=torch.float64)

    def logits(router_weight, w_gate):
        return torch.func.functional_call(
            layer.router, {"weight": router_weight}, (x, w_gate)
        ).logits

    inputs = (
        layer.router.weight.detach().clone().requires_grad_(),
        layer.experts.w_gate.detach().clone().requires_grad_(),
    )
    assert torch.autograd.gradcheck(logits, inputs)


@pytest.mark.parametrize(
    "options", [dict(), dict(expert_matrix="down", temperature=0.5), dict(expert_bias=True)]
)
def test_precompute_routers_gives_identical_outputs(options):
    layer = make_layer(**options).eval()
    if layer.router.expert_bias is not None:
        layer.router.expert_bias.copy_(torch.linspace(-0.1, 0.1, 8))
    x = torch.randn(4, 6, 16)
    y, info = layer(x)
    precompute_routers(layer)
    assert isinstance(layer.router, SoftmaxTopKRouter) and not isinstance(layer.router, MPIRouter)
    y_fast, info_fast = layer(x)
    torch.testing.assert_close(y_fast, y, rtol=1e-5, atol=1e-6)
    assert torch.equal(info_fast.topk_idx, info.topk_idx)
    torch.testing.assert_close(info_fast.logits, info.logits, rtol=1e-5, atol=1e-6)


def test_projection_alignment_is_one_for_principal_direction_and_higher_under_mpi():
    torch.manual_seed(0)
    w = torch.randn(3, 10, 6, dtype=torch.float64)
    principal = torch.linalg.svd(w).Vh[:, 0, :]  # top right singular vectors of each F×D matrix
    torch.testing.assert_close(
        projection_alignment(principal * 3.0, w), torch.ones(3, dtype=torch.float64)
    )
    random_rows = torch.randn(3, 6, dtype=torch.float64)
    alignment = projection_alignment(random_rows, w)
    assert torch.all(alignment < 1) and torch.all(alignment > 0)
    # one power step can only move a row toward the principal direction
    stepped = torch.einsum("efd,ef->ed", w, torch.einsum("efd,ed->ef", w, random_rows))
    assert torch.all(projection_alignment(stepped, w) >= alignment)


def test_projection_alignment_of_a_diverged_expert_is_nan_not_an_error():
    torch.manual_seed(0)
    w = torch.randn(3, 10, 6, dtype=torch.float64)
    rows = torch.randn(3, 6, dtype=torch.float64)
    healthy = projection_alignment(rows, w)
    w[1, 2, 3] = torch.nan
    rows[2, 0] = torch.inf
    alignment = projection_alignment(rows, w)
    assert torch.isnan(alignment[1:]).all()
    assert alignment[0] == healthy[0]  # the finite expert is unaffected
