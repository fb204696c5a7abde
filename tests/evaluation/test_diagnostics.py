"""Routing diagnostics (DESIGN.md §3–4) against hand-worked values."""

import math

import pytest
import torch

from moealign.evaluation.diagnostics import (
    dead_experts,
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
