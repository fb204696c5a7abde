"""Routing alignment loss (DESIGN.md §4) against a float64 hand computation."""

import math

import pytest
import torch

from helpers_saturated import saturated_logits
from moealign.alignment.loss import routing_alignment_loss, task_routing_distributions


def reference(probs_per_layer, task_ids, prior):
    """Float64: for each task, per-layer mean probs, KL to the prior, summed over layers."""
    tasks = sorted({int(t) for t in task_ids if t >= 0})
    total = 0.0
    for task in tasks:
        mask = task_ids == task
        for layer, probs in enumerate(probs_per_layer):
            p = probs[mask].double().mean(0)
            q = prior[layer].double()
            total += sum(
                float(pe * math.log(pe / qe)) for pe, qe in zip(p, q, strict=True) if pe > 0
            )
    return total / len(tasks)


def test_matches_float64_reference_and_ignores_untagged_tokens():
    torch.manual_seed(0)
    probs = [torch.softmax(torch.randn(12, 4), -1) for _ in range(3)]
    task_ids = torch.tensor([0, 0, 2, 2, 2, -1, -1, 5, 0, 5, 2, -1])
    prior = torch.softmax(torch.randn(3, 4), -1)
    loss = routing_alignment_loss(probs, task_ids, prior)
    assert loss.item() == pytest.approx(reference(probs, task_ids, prior), rel=1e-5)


def test_float64_inputs_stay_float64():
    """Float64 routing probabilities give a float64 loss equal to the float64 reference to
    ~1e-14 (a float32 computation would be off by ~1e-8)."""
    torch.manual_seed(1)
    probs = [torch.softmax(torch.randn(40, 6, dtype=torch.float64), -1) for _ in range(2)]
    task_ids = torch.tensor([0, 1, 2, 3] * 10)
    prior = torch.softmax(torch.randn(2, 6, dtype=torch.float64), -1)
    loss = routing_alignment_loss(probs, task_ids, prior)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(reference(probs, task_ids, prior), rel=1e-13, abs=1e-15)


def test_kl_to_uniform_is_log_e_minus_entropy():
    p = torch.tensor([[0.7, 0.1, 0.1, 0.1]])
    entropy = -(p * p.log()).sum()
    loss = routing_alignment_loss([p], torch.tensor([3]), torch.full((1, 4), 0.25))
    assert loss.item() == pytest.approx(math.log(4) - entropy.item(), rel=1e-6)


def test_zero_when_every_task_routes_like_the_prior():
    prior = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    probs = prior.expand(6, 4).clone().requires_grad_()
    loss = routing_alignment_loss([probs], torch.tensor([0, 0, 1, 1, 2, 2]), prior)
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    # a token-level deviation that cancels within a task also gives zero
    shifted = torch.tensor([[0.5, 0.2, 0.2, 0.1], [0.3, 0.4, 0.2, 0.1]])
    assert routing_alignment_loss([shifted], torch.tensor([1, 1]), prior).item() == pytest.approx(
        0.0, abs=1e-7
    )


def test_gradient_flows_to_probs_not_to_prior():
    logits = torch.randn(8, 4, requires_grad=True)
    prior = torch.full((1, 4), 0.25, requires_grad=True)
    loss = routing_alignment_loss(
        [torch.softmax(logits, -1)], torch.tensor([0] * 4 + [1] * 4), prior
    )
    loss.backward()
    assert logits.grad.abs().sum() > 0
    assert prior.grad is None


def test_batch_without_tasks_gives_zero_with_graph():
    logits = torch.randn(5, 4, requires_grad=True)
    loss = routing_alignment_loss(
        [torch.softmax(logits, -1)], torch.full((5,), -1), torch.full((1, 4), 0.25)
    )
    assert loss.item() == 0.0
    loss.backward()  # does not raise


def test_task_distributions_and_shape_errors():
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    tasks, dist = task_routing_distributions(probs, torch.tensor([4, 4, 1]))
    assert tasks.tolist() == [1, 4]
    torch.testing.assert_close(dist, torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    with pytest.raises(ValueError, match="task_ids has 2 tokens but probs has 3"):
        task_routing_distributions(probs, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="prior has 2 layers but 1 were given"):
        routing_alignment_loss([probs], torch.tensor([0, 0, 0]), torch.full((2, 2), 0.5))


def test_exact_zero_probabilities_give_finite_values_and_gradients():
    """fp32 logit gaps >= 104: some p(e|τ) are exactly 0; KL and its gradient stay finite and
    match the float64 computation (where those probabilities are tiny but positive)."""
    logits = saturated_logits(n_tokens=12).requires_grad_(True)
    logits64 = logits.detach().double().requires_grad_(True)
    task_ids = torch.tensor([0, 1] * 6)  # task 0 holds the even tokens: p(2|0) = 0 exactly
    prior = torch.softmax(torch.randn(1, 4, generator=torch.Generator().manual_seed(3)), -1)
    loss = routing_alignment_loss([torch.softmax(logits, -1)], task_ids, prior)
    _, p_NE = task_routing_distributions(torch.softmax(logits, -1).detach(), task_ids)
    assert (p_NE == 0).any()
    p64 = [torch.softmax(logits64, -1)[task_ids == t].mean(0) for t in (0, 1)]
    q64 = prior[0].double()
    loss64 = sum((p * (p.log() - q64.log())).sum() for p in p64) / 2
    loss.backward()
    loss64.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits.grad.double(), logits64.grad, rtol=1e-5, atol=1e-6)
