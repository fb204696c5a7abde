"""Routing logits whose float32 softmax holds exact zeros (DESIGN.md §4: 0·log 0 = 0)."""

import torch

# e^−104 ≈ 6.8e−46 is below float32's smallest subnormal (1.4e−45): a logit gap of 104 or more
# gives a probability of exactly 0 in float32, a tiny positive one in float64.
SATURATING_GAP = 104.0


def saturated_logits(n_tokens: int = 12, n_experts: int = 4, seed: int = 0) -> torch.Tensor:
    """(T, E) float32 logits: expert 0 sits 120 below the others for every token and expert 2
    104–110 below for every other token, so their float32 softmax is exactly 0 there."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_tokens, n_experts, generator=generator)
    logits[:, 0] -= 120.0
    logits[::2, 2] -= SATURATING_GAP + 6.0 * torch.rand(len(logits[::2]), generator=generator)
    probs = torch.softmax(logits, -1)
    assert (probs[:, 0] == 0).all() and (probs[::2, 2] == 0).all()
    assert (torch.softmax(logits.double(), -1) > 0).all()
    return logits
