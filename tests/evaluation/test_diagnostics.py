"""Routing diagnostics (DESIGN.md §3–4) against hand-worked values."""

import math

import pytest
import torch

from helpers_saturated import saturated_logits
from moealign.evaluation.diagnostics import (
    dead_experts,
    entropy,
    expert_utilisation,
    max_violation,
    token_entropy,
    usage_entropy,
)


def test_max_violation_hand_worked():
    assert max_violation(torch.tensor([4, 0, 0, 0])).item() == pytest.approx(3.0)
    assert max_violation(torch.tensor([2, 2, 2, 2])).item() == 0.0
    # per layer for (L, E): (6 − 4)/4 and (5 − 4)/4
    torch.testing.assert_close(
        max_violation(torch.tensor([[6, 2, 4, 4], [5, 3, 4, 4]])),
        torch.tensor([0.5, 0.25], dtype=torch.float64),
    )


def test_utilisation_and_dead_experts():
    counts = torch.tensor([[3, 1, 0, 0], [1, 1, 1, 1]])
    torch.testing.assert_close(
        expert_utilisation(counts)[0], torch.tensor([3.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    )
    assert dead_experts(counts).tolist() == [2, 0]


def test_entropies():
    assert usage_entropy(torch.tensor([5, 5, 5, 5])).item() == pytest.approx(1.0)
    assert usage_entropy(torch.tensor([8, 0, 0, 0])).item() == pytest.approx(0.0)
    assert usage_entropy(torch.tensor([1, 1, 0, 0]), normalized=False).item() == pytest.approx(
        math.log(2)
    )
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert token_entropy(probs, normalized=False).item() == pytest.approx(math.log(2) / 2)
    assert token_entropy(torch.full((3, 8), 1 / 8)).item() == pytest.approx(1.0)


def test_entropies_are_finite_with_finite_gradients_at_exact_zero_probabilities():
    logits = saturated_logits().requires_grad_(True)
    logits64 = logits.detach().double().requires_grad_(True)
    probs, probs64 = torch.softmax(logits, -1), torch.softmax(logits64, -1)
    assert (probs == 0).any()
    value = token_entropy(probs) + entropy(probs, normalized=False).sum()
    reference = -(probs64 * probs64.log()).sum(-1)
    value64 = reference.mean() / math.log(4) + reference.sum()
    value.backward()
    value64.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()
    torch.testing.assert_close(value, value64, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits.grad.double(), logits64.grad, rtol=1e-5, atol=1e-6)
