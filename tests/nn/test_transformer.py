"""The decoder-only LM: causality, rotary embeddings, parameter counts, configuration errors."""

import pytest
import torch

from moealign.nn import MoELayer
from moealign.nn.transformer import ModelConfig, MoETransformer, RotaryEmbedding

TINY = dict(
    vocab_size=64,
    d_model=32,
    n_layers=2,
    n_heads=4,
    max_seq_len=16,
    expert_d_ff=16,
    n_experts=4,
    top_k=2,
    d_ff=64,
)


@pytest.mark.parametrize("router", ["softmax_topk", "switch", "hierarchical", "mpi"])
def test_every_router_kind_builds_and_is_causal(router):
    torch.manual_seed(0)
    top_k = 1 if router == "switch" else 2
    options = {"n_groups": 2} if router == "hierarchical" else {}
    model = MoETransformer(
        ModelConfig(**TINY | dict(router=router, top_k=top_k, router_options=options))
    )
    model.eval()
    ids = torch.randint(0, 64, (2, 10))
    out = model(ids)
    assert out.logits.shape == (2, 10, 64)
    assert len(out.routing) == 2
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 64
    # Routing depends only on each token's own hidden state, which only sees the past.
    torch.testing.assert_close(model(changed).logits[:, :6], out.logits[:, :6])


def test_rotary_matches_complex_multiplication():
    rotary = RotaryEmbedding(8, 12, 10000.0)
    x = torch.randn(1, 2, 12, 8)
    pairs = torch.view_as_complex(x.view(1, 2, 12, 4, 2))
    freqs = 10000.0 ** (-torch.arange(0, 8, 2).float() / 8)
    angles = torch.outer(torch.arange(12).float(), freqs)
    expected = torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)).flatten(-2)
    torch.testing.assert_close(rotary(x), expected, rtol=1e-5, atol=1e-5)


def test_rotary_scores_depend_only_on_relative_position():
    rotary = RotaryEmbedding(8, 20, 10000.0)
    q, k = torch.randn(8), torch.randn(8)

    def score(i, j):
        q_pos = rotary(q.expand(1, 1, 20, 8))[0, 0, i]
        k_pos = rotary(k.expand(1, 1, 20, 8))[0, 0, j]
        return q_pos @ k_pos

    torch.testing.assert_close(score(5, 2), score(15, 12), rtol=1e-4, atol=1e-5)


def test_parameter_counts_and_dense_matched_baseline():
    config = ModelConfig(**TINY)
    moe = MoETransformer(config)
    dense = MoETransformer(config.dense_matched())
    counts, dense_counts = moe.parameter_counts(), dense.parameter_counts()
    expert_params = 3 * 4 * 16 * 32  # three (E, F, D) tensors per layer
    router_params = 4 * 32
    assert counts["total"] - counts["active"] == 2 * expert_params // 2  # half the experts idle
    assert dense_counts["total"] == dense_counts["active"]
    # Active MoE = dense-matched + the routers (the dense FFN has K·F = 32 hidden units).
    assert counts["active"] == dense_counts["total"] + 2 * router_params
    assert counts["total"] == sum(p.numel() for p in moe.parameters())


# The initialisation rule (DESIGN.md §2, MoETransformer docstring): embeddings and attention
# matrices N(0, init_std²); every FFN matrix (dense SwiGLU, shared expert, routed experts)
# N(0, 1/fan_in); every residual output projection (attention out, FFN/expert down) × 1/√(2L).
INIT = TINY | dict(
    d_model=64, n_layers=4, n_experts=8, expert_d_ff=48, d_ff=96, moe_every=2, shared_d_ff=32
)


def assert_normal_std(weight, expected, role):
    """A seeded N(0, σ²) sample of n values: its std is within 5 standard errors
    (σ/√(2n)) of σ and its mean within 5 σ/√n of 0 (a statistical tolerance)."""
    values = weight.detach().double().flatten()
    n = values.numel()
    assert abs(values.std().item() / expected - 1) < 5 / (2 * n) ** 0.5, role
    assert abs(values.mean().item()) < 5 * expected / n**0.5, role


def test_every_matrix_follows_the_initialisation_rule():
    torch.manual_seed(0)
    config = ModelConfig(**INIT)
    model = MoETransformer(config)
    depth = (2 * config.n_layers) ** -0.5
    width = config.d_model
    assert_normal_std(model.embed.weight, config.init_std, "embed")
    for i, block in enumerate(model.blocks):
        assert_normal_std(block.attn.qkv.weight, config.init_std, f"{i}.qkv")
        assert_normal_std(block.attn.out.weight, config.init_std * depth, f"{i}.out")
        ffn = block.ffn
        if isinstance(ffn, MoELayer):
            swiglus = [(ffn.experts, config.expert_d_ff), (ffn.shared_expert, config.shared_d_ff)]
        else:
            swiglus = [(ffn, config.d_ff)]
        for swiglu, hidden in swiglus:
            for name in ("w_gate", "w_up"):
                weight = getattr(swiglu, name)
                weight = weight.weight if isinstance(weight, torch.nn.Linear) else weight
                assert_normal_std(weight, width**-0.5, f"{i}.{name}")
            down = swiglu.w_down
            down = down.weight if isinstance(down, torch.nn.Linear) else down
            assert_normal_std(down, depth * hidden**-0.5, f"{i}.w_down")


def test_dense_and_moe_models_start_from_the_same_distribution_per_matrix_role():
    """The dense baseline of matched active width and the MoE model: per role (gate, up, down),
    the weights divided by the rule's σ (fan-in, depth) are samples of one standard normal
    (two-sample Kolmogorov–Smirnov), and the gate/up σ (fan-in D in both) is the same."""
    scipy_stats = pytest.importorskip("scipy.stats")
    config = ModelConfig(**INIT | dict(moe_every=1, shared_d_ff=0))
    torch.manual_seed(0)
    moe = MoETransformer(config)
    torch.manual_seed(1)
    dense = MoETransformer(config.dense_matched())
    depth = (2 * config.n_layers) ** -0.5
    for name, scale in (("w_gate", 1.0), ("w_up", 1.0), ("w_down", depth)):
        expert_weights = torch.cat(
            [getattr(layer.experts, name).detach().flatten() for layer in moe.moe_layers]
        )
        dense_weights = torch.cat(
            [getattr(block.ffn, name).weight.detach().flatten() for block in dense.blocks]
        )
        fan_in_expert = getattr(moe.moe_layers[0].experts, name).shape[-1]
        fan_in_dense = getattr(dense.blocks[0].ffn, name).weight.shape[-1]
        standard_expert = expert_weights * fan_in_expert**0.5 / scale
        standard_dense = dense_weights * fan_in_dense**0.5 / scale
        assert scipy_stats.ks_2samp(standard_expert.numpy(), standard_dense.numpy()).pvalue > 1e-3
        if name != "w_down":
            ratio = expert_weights.std() / dense_weights.std()
            assert abs(ratio.item() - 1) < 0.03, name


def test_moe_every_and_shared_expert():
    model = MoETransformer(ModelConfig(**TINY | dict(n_layers=4, moe_every=2, shared_d_ff=8)))
    kinds = [isinstance(block.ffn, MoELayer) for block in model.blocks]
    assert kinds == [False, True, False, True]
    assert model.moe_layers[0].shared_expert is not None


def test_tied_embeddings_share_storage():
    model = MoETransformer(ModelConfig(**TINY))
    assert model.lm_head.weight is model.embed.weight
    untied = MoETransformer(ModelConfig(**TINY | dict(tie_embeddings=False)))
    assert untied.lm_head.weight is not untied.embed.weight


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(ffn="sparse"), "^ffn: got 'sparse'"),
        (dict(router="topk"), "^router: got 'topk'"),
        (dict(n_heads=3), "^n_heads: got 3"),
        (dict(top_k=5), "^top_k: got 5"),
        (dict(d_model=0), "^d_model: got 0"),
    ],
)
def test_bad_config_names_the_field(change, match):
    with pytest.raises(ValueError, match=match):
        MoETransformer(ModelConfig(**TINY | change))


def test_sequence_longer_than_context_is_rejected():
    model = MoETransformer(ModelConfig(**TINY))
    with pytest.raises(ValueError, match="max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
