"""Auxiliary losses (DESIGN.md §4) against hand-worked values and transformers' implementation."""

import math

import pytest
import torch

from moealign.nn import MoELayer
from moealign.nn.losses import load_balance_loss, z_loss


def test_perfect_balance_is_one():
    probs = torch.full((4, 4), 0.25)
    idx = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    assert load_balance_loss(probs, idx, 4).item() == pytest.approx(1.0)


def test_hand_worked_imbalance():
    # E=2, K=1, T=2: both tokens to expert 0; probs rows (0.9, 0.1) and (0.7, 0.3)
    probs = torch.tensor([[0.9, 0.1], [0.7, 0.3]])
    idx = torch.tensor([[0], [0]])
    # f = (1, 0), P = (0.8, 0.2) → 2 · (1·0.8) = 1.6
    assert load_balance_loss(probs, idx, 2).item() == pytest.approx(1.6)


def test_sequence_scope_averages_per_sequence_losses():
    probs = torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.5, 0.5], [0.5, 0.5]])
    idx = torch.tensor([[0], [0], [0], [1]])
    # sequence 1: 1.6 (above); sequence 2: f = (.5, .5), P = (.5, .5) → 1.0; mean 1.3
    assert load_balance_loss(
        probs, idx, 2, scope="sequence", sequence_length=2
    ).item() == pytest.approx(1.3)
    # batch scope over all 4: f = (.75, .25), P = (.65, .35) → 2·(.4875 + .0875) = 1.15
    assert load_balance_loss(probs, idx, 2).item() == pytest.approx(1.15)
    with pytest.raises(ValueError, match="sequence_length=3"):
        load_balance_loss(probs, idx, 2, scope="sequence", sequence_length=3)


def test_matches_transformers_up_to_its_factor_k():
    # transformers normalises f by T (not T·K): its value is K times ours for a single layer.
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    torch.manual_seed(0)
    logits = torch.randn(50, 8)
    probs = torch.softmax(logits, -1)
    idx = probs.topk(2, -1).indices
    ours = load_balance_loss(probs, idx, 8)
    theirs = mixtral.load_balancing_loss_func((logits,), num_experts=8, top_k=2)
    torch.testing.assert_close(2 * ours, theirs)


def test_balance_loss_uses_full_softmax_not_topk_renormalised_probs():
    # Pitfall: P from top-k-renormalised weights. With the full softmax, P_e includes mass on
    # experts outside the top-k; a renormalised version would not and would give a different value.
    torch.manual_seed(1)
    layer = MoELayer(8, 16, 4, 2)
    x = torch.randn(30, 8)
    _, info = layer(x)
    expected = load_balance_loss(torch.softmax(info.logits, -1), info.topk_idx, 4)
    torch.testing.assert_close(info.load_balance_loss, expected)
    renormalised = torch.zeros_like(info.probs).scatter(-1, info.topk_idx, info.topk_weight)
    wrong = load_balance_loss(renormalised, info.topk_idx, 4)
    assert not torch.isclose(info.load_balance_loss, wrong)


def test_balance_loss_detects_double_softmax():
    # Pitfall (transformers #45120): softmax applied to probabilities flattens them toward uniform.
    # A collapsed router (every token certain of expert 0) must score E = 4, not 4·e/(e+3) ≈ 1.9.
    layer = MoELayer(4, 8, 4, 1, router="switch")
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 100.0
    x = torch.zeros(10, 4)
    x[:, 0] = 1.0
    _, info = layer(x)
    assert info.load_balance_loss.item() == pytest.approx(4.0)
    double = load_balance_loss(torch.softmax(info.probs, -1), info.topk_idx, 4)
    assert double.item() == pytest.approx(4 * math.e / (math.e + 3))


def test_balance_loss_gradient_flows_to_router_only_through_probs():
    layer = MoELayer(8, 16, 4, 2)
    _, info = layer(torch.randn(20, 8))
    info.load_balance_loss.backward()
    assert layer.router.weight.grad.abs().sum() > 0


def test_z_loss_hand_worked():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp: log 2 and log 4 → mean of squares
    expected = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert z_loss(logits).item() == pytest.approx(expected)
    assert z_loss(torch.zeros(3, 4)).item() == pytest.approx(math.log(4) ** 2)


def test_layer_sequence_scope_uses_rows_of_batched_input():
    torch.manual_seed(3)
    layer = MoELayer(8, 16, 4, 2, balance_scope="sequence")
    x = torch.randn(3, 5, 8)
    _, info = layer(x)
    per_sequence = [
        load_balance_loss(info.probs[5 * b : 5 * b + 5], info.topk_idx[5 * b : 5 * b + 5], 4)
        for b in range(3)
    ]
    torch.testing.assert_close(info.load_balance_loss, torch.stack(per_sequence).mean())


def test_global_scope_without_a_process_group_is_the_batch_loss():
    torch.manual_seed(4)
    probs = torch.softmax(torch.randn(12, 4), -1)
    idx = probs.topk(2, -1).indices
    torch.testing.assert_close(
        load_balance_loss(probs, idx, 4, scope="global"), load_balance_loss(probs, idx, 4)
    )
