"""The safe p·log p of DESIGN.md §4 (0·log 0 = 0, finite gradients) against float64."""

import torch

from helpers_saturated import saturated_logits
from moealign.nn.functional import plogp


def test_plogp_is_zero_at_zero_with_a_finite_gradient():
    p = torch.tensor([0.0, 0.25, 1.0], requires_grad=True)
    value = plogp(p)
    torch.testing.assert_close(
        value, torch.tensor([0.0, 0.25 * torch.log(torch.tensor(0.25)), 0.0])
    )
    value.sum().backward()
    # d/dp p log p = log p + 1 where p > 0; 0 (not NaN or −inf) at p = 0.
    torch.testing.assert_close(
        p.grad, torch.tensor([0.0, float(torch.log(torch.tensor(0.25))) + 1, 1.0])
    )


def test_entropy_through_softmax_with_exact_zeros_matches_float64():
    logits = saturated_logits().requires_grad_(True)
    logits64 = logits.detach().double().requires_grad_(True)
    entropy = -plogp(torch.softmax(logits, -1)).sum()
    probs64 = torch.softmax(logits64, -1)
    entropy64 = -(probs64 * probs64.log()).sum()  # float64: no exact zeros, the plain formula
    entropy.backward()
    entropy64.backward()
    assert torch.isfinite(logits.grad).all()
    torch.testing.assert_close(entropy.double(), entropy64, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits.grad.double(), logits64.grad, rtol=1e-5, atol=1e-6)
