"""Routers against float64 references of DESIGN.md §2; options; bad input."""

import math

import pytest
import torch

from moealign.nn import MoELayer, build_router, update_expert_biases
from moealign.nn.routers import capacity_keep_mask


def test_softmax_topk_matches_float64_reference_with_temperature():
    torch.manual_seed(0)
    router = build_router("softmax_topk", 12, 6, 2, temperature=0.7).double()
    x = torch.randn(9, 12, dtype=torch.float64)
    out = router(x)
    logits = x @ router.weight.detach().T / 0.7
    probs = torch.softmax(logits, -1)
    top = probs.topk(2, -1)
    torch.testing.assert_close(out.logits, logits)
    torch.testing.assert_close(out.probs, probs)
    assert torch.equal(out.topk_idx, top.indices)
    torch.testing.assert_close(out.topk_weight, top.values / top.values.sum(-1, keepdim=True))
    # Renormalised top-k weights equal a softmax over the chosen logits (Eq. 6 of the MPI paper).
    torch.testing.assert_close(out.topk_weight, torch.softmax(logits.gather(-1, top.indices), -1))


def test_normalize_topk_off_keeps_raw_probabilities():
    router = build_router("softmax_topk", 8, 4, 2, normalize_topk=False)
    out = router(torch.randn(5, 8))
    torch.testing.assert_close(out.topk_weight, out.probs.gather(-1, out.topk_idx))


def test_switch_router_is_top1_and_keeps_gradient_through_weight():
    router = build_router("switch", 8, 4, 1)
    x = torch.randn(10, 8)
    out = router(x)
    assert out.topk_idx.shape == (10, 1)
    torch.testing.assert_close(out.topk_weight, out.probs.max(-1, keepdim=True).values)
    out.topk_weight.sum().backward()
    assert router.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="top_k"):
        build_router("switch", 8, 4, 2)


def test_hierarchical_probabilities_factorise_and_selection_stays_in_chosen_groups():
    torch.manual_seed(3)
    router = build_router("hierarchical", 10, 8, 2, n_groups=4, topk_groups=1).double()
    x = torch.randn(20, 10, dtype=torch.float64)
    out = router(x)
    p_group = torch.softmax(x @ router.group_weight.detach().T, -1)  # (T, G)
    expert_logits = (x @ router.weight.detach().T).view(20, 4, 2)
    p_within = torch.softmax(expert_logits, -1)  # (T, G, 2)
    expected = (p_group.unsqueeze(-1) * p_within).view(20, 8)
    torch.testing.assert_close(out.probs, expected)
    torch.testing.assert_close(torch.softmax(out.logits, -1), out.probs)
    best_group = p_group.argmax(-1)
    assert torch.equal(out.topk_idx // 2, best_group.unsqueeze(-1).expand(-1, 2))


def test_hierarchical_with_two_groups_chooses_best_experts_among_them():
    torch.manual_seed(4)
    router = build_router("hierarchical", 6, 9, 2, n_groups=3, topk_groups=2)
    out = router(torch.randn(15, 6))
    group_probs = out.probs.view(15, 3, 3).sum(-1)
    chosen = group_probs.topk(2, -1).indices
    masked = out.probs.view(15, 3, 3).clone()
    for t in range(15):
        for g in range(3):
            if g not in chosen[t]:
                masked[t, g] = -1
    assert torch.equal(out.topk_idx, masked.view(15, 9).topk(2, -1).indices)


def test_expert_bias_steers_selection_only_and_updates_by_sign():
    router = build_router("softmax_topk", 4, 4, 1, expert_bias=True, bias_update_rate=0.1)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[0, 0] = 1.0  # every token with x_0 > 0 prefers expert 0
        router.expert_bias.copy_(torch.tensor([0.0, 5.0, 0.0, 0.0]))
    x = torch.tensor([[1.0, 0, 0, 0]] * 3)
    out = router(x)
    assert out.topk_idx.flatten().tolist() == [1, 1, 1]  # bias decides the choice ...
    torch.testing.assert_close(out.topk_weight, torch.ones(3, 1))  # ... weights unaffected
    torch.testing.assert_close(router.tokens_per_expert, torch.tensor([0.0, 3, 0, 0]))
    update_expert_biases(router)
    # mean count 0.75: expert 1 is overloaded (−u), the others underloaded (+u)
    torch.testing.assert_close(router.expert_bias, torch.tensor([0.1, 4.9, 0.1, 0.1]))
    assert router.tokens_per_expert.sum() == 0
    router.eval()
    router(x)
    assert router.tokens_per_expert.sum() == 0  # evaluation does not count


def test_capacity_mask_hand_worked():
    # 4 tokens, top-2, 2 experts, factor 0.5 → capacity ceil(4·2/2·0.5) = 2 per expert.
    idx = torch.tensor([[0, 1], [0, 1], [0, 1], [1, 0]])
    keep = capacity_keep_mask(idx, 2, 0.5)
    # first choices in token order: e0,e0,e0,e1 → e0 keeps tokens 0,1; e1 keeps token 3
    # second choices: e1 (tokens 0,1,2) → only token 0 fits; e0 (token 3) is full
    assert keep.tolist() == [[True, True], [True, False], [False, False], [True, False]]


def test_capacity_factor_drops_overflow_in_the_layer():
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, 1, router="switch", capacity_factor=1.0)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2, 0] = 10.0
    x = torch.randn(12, 8).abs()
    y, info = layer(x)
    assert info.expert_counts[2] == 3  # capacity ceil(12/4) = 3
    dropped = ~info.keep.squeeze(-1)
    assert dropped.sum() == 9
    assert torch.all(y[dropped] == 0)


def test_logit_dropout_and_jitter_act_only_in_training():
    torch.manual_seed(0)
    router = build_router("softmax_topk", 8, 4, 2, logit_dropout=0.5, jitter=0.2)
    x = torch.randn(64, 8)
    router.eval()
    first, second = router(x), router(x)
    assert torch.equal(first.logits, second.logits)
    router.train()
    noisy = router(x)
    assert torch.isneginf(noisy.logits).any()  # dropped experts
    assert not torch.allclose(noisy.logits, first.logits)


@pytest.mark.parametrize("kind", ["softmax_topk", "hierarchical", "mpi"])
def test_logit_dropout_matches_float64_reference_with_a_fixed_mask(kind):
    """Dropped experts get logit −inf; kept logits are those of evaluation (no 1/(1−p) scale,
    one temperature); at least one expert per token stays (DESIGN.md §4)."""
    torch.manual_seed(0)
    layer = MoELayer(12, 16, 6, 2, router=kind, temperature=0.7, logit_dropout=0.6)
    x = torch.randn(40, 12)
    layer.eval()
    _, evaluated = layer(x)
    layer.train()
    torch.manual_seed(123)
    _, trained = layer(x)
    # The mask: one U[0, 1) draw per (token, expert) in float32 from the same seed; an expert
    # is dropped when its draw is < p, except the token's largest draw (kept at least one).
    torch.manual_seed(123)
    draws = torch.rand(40, 6)
    keep = (draws >= 0.6) | (draws == draws.amax(-1, keepdim=True))
    assert (~keep).any() and (keep.sum(-1) == 1).any()  # both cases occur at p = 0.6
    assert torch.equal(torch.isneginf(trained.logits), ~keep)
    assert torch.equal(trained.logits[keep], evaluated.logits[keep])  # same temperature
    # float64 reference: softmax over the kept logits only.
    with torch.no_grad():
        logits64 = evaluated.logits.double().masked_fill(~keep, -math.inf)
    probs64 = torch.softmax(logits64, -1)
    torch.testing.assert_close(trained.probs.double(), probs64, rtol=1e-6, atol=1e-7)
    assert torch.all(trained.probs[~keep] == 0)  # exactly zero, not just small
    # The chosen experts are kept ones wherever the token kept at least K = 2 of them (the
    # hierarchical router chooses inside its top group, which may keep fewer).
    chosen_kept = keep.gather(-1, trained.topk_idx)
    if kind != "hierarchical":
        assert chosen_kept[keep.sum(-1) >= 2].all()
    weights = trained.topk_weight.double()
    torch.testing.assert_close(weights.sum(-1), torch.ones(40, dtype=torch.float64))
    assert torch.all(trained.topk_weight[~chosen_kept] == 0)


def test_logit_dropout_keeps_losses_and_gradients_finite():
    from moealign.alignment.loss import routing_alignment_loss

    torch.manual_seed(1)
    layer = MoELayer(8, 16, 4, 2, logit_dropout=0.5).train()
    x = torch.randn(2, 16, 8, requires_grad=True)
    y, info = layer(x)
    assert torch.isneginf(info.logits).any()
    task_ids = torch.arange(32) % 3
    align = routing_alignment_loss([info.probs], task_ids, torch.full((1, 4), 0.25))
    from moealign.evaluation.diagnostics import token_entropy

    loss = (
        y.square().mean()
        + info.load_balance_loss
        + info.z_loss
        + align
        - token_entropy(info.probs).float()
    )
    assert torch.isfinite(loss)
    loss.backward()
    for tensor in (x.grad, *(p.grad for p in layer.parameters())):
        assert torch.isfinite(tensor).all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(router="nope"), "router='nope'.*softmax_topk"),
        (dict(top_k=9), "top_k=9"),
        (dict(router="hierarchical", n_groups=3), "n_groups=3.*divisor"),
        (dict(router="hierarchical", n_groups=4, topk_groups=5), "topk_groups=5"),
        (dict(temperature=0.0), "temperature=0.0"),
        (dict(capacity_factor=-1.0), "capacity_factor=-1.0"),
        (dict(router="mpi", expert_matrix="value"), "expert_matrix='value'.*gate"),
        (dict(router="softmax_topk", c_prime=2.0), "not accepted by router='softmax_topk'"),
        (dict(balance_scope="tokens"), "balance_scope='tokens'"),
    ],
)
def test_bad_configuration_names_the_argument(kwargs, match):
    base = dict(d_model=8, d_ff=16, n_experts=8, top_k=2)
    with pytest.raises(ValueError, match=match):
        MoELayer(**(base | kwargs))


def test_wrong_input_width_is_a_clear_error():
    layer = MoELayer(8, 16, 4, 2)
    with pytest.raises(ValueError, match="input width 7 does not match d_model=8"):
        layer(torch.randn(3, 7))


def test_info_shapes_for_batched_input():
    layer = MoELayer(8, 16, 4, 2)
    y, info = layer(torch.randn(2, 5, 8))
    assert y.shape == (2, 5, 8)
    assert info.logits.shape == info.probs.shape == (10, 4)
    assert info.logits.dtype == torch.float32
    assert info.topk_idx.shape == info.topk_weight.shape == (10, 2)
    assert int(info.expert_counts.sum()) == 20
    assert math.isfinite(info.load_balance_loss.item()) and math.isfinite(info.z_loss.item())


@pytest.mark.parametrize("kind", ["softmax_topk", "mpi"])
def test_router_logits_stay_float32_under_bf16_autocast(kind):
    torch.manual_seed(0)
    layer = MoELayer(16, 32, 4, 2, router=kind)
    x = torch.randn(6, 16)
    _, reference = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, info = layer(x)
    assert info.logits.dtype == torch.float32
    torch.testing.assert_close(info.logits, reference.logits)  # no bf16 rounding in the router
    assert y.dtype == torch.float32  # the layer returns the input dtype
