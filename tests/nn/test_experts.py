"""Expert dispatch: grouped matmul vs the per-expert loop vs transformers' Mixtral block."""

import pytest
import torch

from moealign.nn import MoELayer, SwiGLUExperts, grouped_mm_supported


def dense_reference(experts, x_TD, idx_TK, weight_TK):
    """Float64 y_t = Σ_k w_tk W_down (silu(W_gate x) ⊙ W_up x), expert by expert, token by token."""
    w_gate, w_up, w_down = (
        w.detach().double() for w in (experts.w_gate, experts.w_up, experts.w_down)
    )
    x = x_TD.double()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(idx_TK.shape[1]):
            e = idx_TK[t, k]
            hidden = torch.nn.functional.silu(w_gate[e] @ x[t]) * (w_up[e] @ x[t])
            out[t] += weight_TK[t, k].double() * (w_down[e] @ hidden)
    return out


@pytest.mark.parametrize(
    "n_tokens,n_experts,top_k,d_model,d_ff",
    [
        (1, 4, 1, 8, 16),
        (7, 8, 2, 16, 32),
        (33, 16, 4, 8, 12),
        (64, 6, 3, 12, 20),
    ],
)
@pytest.mark.parametrize("implementation", ["loop", "auto"])
def test_dispatch_matches_reference(n_tokens, n_experts, top_k, d_model, d_ff, implementation):
    torch.manual_seed(n_tokens)
    experts = SwiGLUExperts(n_experts, d_model, d_ff, implementation)
    x = torch.randn(n_tokens, d_model)
    # Route only to the first half of the experts so some receive no token at all.
    idx = torch.stack([torch.randperm(max(top_k, n_experts // 2))[:top_k] for _ in range(n_tokens)])
    weight = torch.rand(n_tokens, top_k)
    y = experts(x, idx, weight)
    torch.testing.assert_close(
        y.double(), dense_reference(experts, x, idx, weight), rtol=1e-4, atol=1e-5
    )


def test_grouped_mm_runs_for_aligned_shapes_and_matches_loop():
    torch.manual_seed(0)
    grouped = SwiGLUExperts(8, 16, 32, "grouped_mm")
    loop = SwiGLUExperts(8, 16, 32, "loop")
    loop.load_state_dict(grouped.state_dict())
    x = torch.randn(40, 16, requires_grad=True)
    x_loop = x.detach().clone().requires_grad_()
    idx = torch.randint(0, 5, (40, 2))  # experts 5..7 get nothing
    weight = torch.rand(40, 2)
    assert grouped_mm_supported(x, grouped.w_gate, grouped.w_down)
    y, y_loop = grouped(x, idx, weight), loop(x_loop, idx, weight)
    torch.testing.assert_close(y, y_loop, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    y_loop.sum().backward()
    torch.testing.assert_close(x.grad, x_loop.grad, rtol=1e-5, atol=1e-5)
    for name in ("w_gate", "w_up", "w_down"):
        torch.testing.assert_close(
            getattr(grouped, name).grad, getattr(loop, name).grad, rtol=1e-5, atol=1e-5
        )
    assert grouped.w_gate.grad[5:].abs().sum() == 0


def test_grouped_mm_refuses_misaligned_shapes_clearly():
    experts = SwiGLUExperts(
        4, 6, 10, "grouped_mm"
    )  # 6 and 10 floats: strides not 16-byte multiples
    with pytest.raises(ValueError, match="experts_implementation='grouped_mm'"):
        experts(torch.randn(3, 6), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1))
    auto = SwiGLUExperts(4, 6, 10, "auto")
    auto.load_state_dict(experts.state_dict())
    assert auto(torch.randn(3, 6), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1)).shape == (
        3,
        6,
    )


def test_dropped_slots_contribute_nothing():
    torch.manual_seed(1)
    experts = SwiGLUExperts(4, 8, 16)
    x, idx, weight = torch.randn(6, 8), torch.randint(0, 4, (6, 2)), torch.rand(6, 2)
    keep = torch.rand(6, 2) > 0.5
    y = experts(x, idx, weight, keep)
    expected = dense_reference(experts, x, idx, weight * keep)
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n_experts,top_k", [(8, 2), (4, 1), (6, 3)])
def test_layer_equals_transformers_mixtral_block_in_float64(n_experts, top_k):
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    torch.manual_seed(n_experts)
    d_model, d_ff = 16, 24
    config = mixtral.MixtralConfig(
        hidden_size=d_model,
        intermediate_size=d_ff,
        num_local_experts=n_experts,
        num_experts_per_tok=top_k,
        router_jitter_noise=0.0,
    )
    peer = mixtral.MixtralSparseMoeBlock(config).double().eval()
    layer = MoELayer(d_model, d_ff, n_experts, top_k, router="softmax_topk").double().eval()
    with torch.no_grad():
        peer.gate.weight.copy_(layer.router.weight)
        peer.experts.gate_up_proj.copy_(
            torch.cat([layer.experts.w_gate, layer.experts.w_up], dim=1)
        )
        peer.experts.down_proj.copy_(layer.experts.w_down)
    x = torch.randn(3, 11, d_model, dtype=torch.float64)
    y, info = layer(x)
    y_peer = peer(x.clone())
    # transformers rounds its routing softmax to float32 (relative error up to 2⁻²⁴ ≈ 6e-8);
    # ours stays float64. Times expert outputs of up to ~3 that is ~2e-7 absolute, also where
    # y itself cancels to near 0 (measured up to 0.7 of the old atol=1e-7 on baseline kernels).
    torch.testing.assert_close(y, y_peer, rtol=1e-6, atol=1e-6)
    logits_peer, weights_peer, idx_peer = peer.gate(x.reshape(-1, d_model))
    torch.testing.assert_close(info.logits.double(), logits_peer.double(), rtol=1e-6, atol=1e-6)
    assert torch.equal(info.topk_idx, idx_peer)
