"""HFRouted.override_routing and the RoMA pipeline (DESIGN.md §5) on tiny random transformers
MoE models, checked against the unmodified models, hand-computed expert outputs, float64 finite
differences and bit-for-bit comparisons of weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers

pytest.importorskip("transformers")  # the models under test are its own

from transformers import PreTrainedTokenizerFast

from helpers_hf import FAMILIES, batch, tiny_model
from helpers_questions import task_questions
from moealign.data.tasks import TaskExample
from moealign.data.tokenizer import ByteTokenizer, TransformersTokenizer
from moealign.integrations.hf import (
    HFRouted,
    MoealignGate,
    capture_routing,
    moe_blocks,
    router_rows,
    swap_routers,
)
from moealign.roma import (
    HashedTrigramEncoder,
    Neighbourhood,
    RouterTrainingConfig,
    c3po_capture,
    capture,
    encode_question,
    find_neighbours,
    neighbour_mixture,
    train_routers,
)

# Every family with its native gates, and one with gates swapped in by swap_routers (rerouted
# by Router.reroute rather than by the forward hook).
VARIANTS = [*FAMILIES, "qwen3_moe+softmax_topk"]


def routed_model(variant: str, dtype=torch.float32) -> HFRouted:
    family, _, swapped = variant.partition("+")
    model = tiny_model(family)
    if swapped:
        swap_routers(model, kind=swapped)
    if dtype == torch.float64:  # transformers' grouped-mm experts take no float64
        model.set_experts_implementation("eager")
    return HFRouted(model.to(dtype))


def expert_output(experts, e: int, x_D: torch.Tensor) -> torch.Tensor:
    """Expert e's SwiGLU output W_down (silu(W_gate x) ⊙ W_up x), from the fused weights."""
    d_ff = experts.down_proj.shape[-1]
    gate_up = experts.gate_up_proj[e] @ x_D
    return experts.down_proj[e] @ (F.silu(gate_up[:d_ff]) * gate_up[d_ff:])


def at_last_token(new_BE: torch.Tensor):
    """A ProbsOverride putting ``new_BE`` at the last position of every row."""

    def override(probs_BSE: torch.Tensor) -> torch.Tensor:
        out = probs_BSE.clone()
        out[:, -1] = new_BE
        return out

    return override


@pytest.mark.parametrize("variant", VARIANTS)
def test_identity_override_keeps_routing_and_logits_bit_for_bit(variant):
    routed, input_ids = routed_model(variant), batch()
    everywhere = {i: (lambda p: p.clone()) for i in range(routed.n_moe_layers())}
    with torch.no_grad():
        base = capture_routing(routed.model, input_ids)
        with routed.override_routing(everywhere):
            same = capture_routing(routed.model, input_ids)
            output = routed.forward(input_ids)
    assert torch.equal(same.logits, base.logits) and torch.equal(output.logits, base.logits)
    for layer, reference, probs in zip(same.layers, base.layers, output.probs, strict=True):
        assert torch.equal(layer.topk_idx, reference.topk_idx)
        assert torch.equal(layer.topk_weight, reference.topk_weight)
        assert torch.equal(probs, reference.probs)


@pytest.mark.parametrize("variant", VARIANTS)
def test_all_mass_on_one_expert_routes_the_last_token_to_it(variant):
    routed, input_ids = routed_model(variant), batch()
    model, block = routed.model, moe_blocks(routed.model)[0]
    seen = []
    handle = block.mlp.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    with torch.no_grad():
        base = capture_routing(model, input_ids)
        chosen = base.layers[0].topk_idx[:, -1]  # (B, K)
        n_experts = base.layers[0].probs.shape[-1]
        # per row, the lowest-numbered expert the router did not choose for the last token
        target = torch.tensor([min(set(range(n_experts)) - set(row.tolist())) for row in chosen])
        one_hot = F.one_hot(target, n_experts).float()
        with routed.override_routing({0: at_last_token(one_hot)}):
            moved = capture_routing(model, input_ids)
    handle.remove()
    layer, reference = moved.layers[0], base.layers[0]
    assert torch.equal(layer.probs[:, -1], one_hot)
    # Other tokens keep the router's decision; the last token's slots: the target gets all
    # the weight (γ = routed_scaling_factor for DeepSeek-V3, 1 otherwise), the rest nothing.
    assert torch.equal(layer.topk_idx[:, :-1], reference.topk_idx[:, :-1])
    assert torch.equal(layer.topk_weight[:, :-1], reference.topk_weight[:, :-1])
    scale = getattr(block.mlp.gate, "routed_scaling_factor", 1.0)
    for b in range(2):
        slot = layer.topk_idx[b, -1].tolist().index(int(target[b]))
        expected = torch.zeros(layer.topk_weight.shape[-1])
        expected[slot] = scale
        torch.testing.assert_close(layer.topk_weight[b, -1].float(), expected, rtol=0, atol=0)
    # Only the last token's logits change (causal attention)... up to fp32 rounding: the
    # experts' GEMMs see other row counts once the last token moved, which may block their
    # sums differently (MKL's AVX2 kernels do; ~2e-6 on logits of ~6, a few ulp).
    torch.testing.assert_close(moved.logits[:, :-1], base.logits[:, :-1], rtol=1e-5, atol=1e-5)
    assert (moved.logits[:, -1] - base.logits[:, -1]).abs().max() > 1e-4
    # ...and the block's output there moved by γ E_target(x) − Σ_k w_k E_k(x) (the shared
    # experts see the same input in both runs), with the experts computed by hand.
    (x_base, y_base), (x_moved, y_moved) = seen
    assert torch.equal(x_base, x_moved)  # the same kernels on the same shapes before the block
    experts = block.mlp.experts
    with torch.no_grad():
        for b in range(2):
            x_D = x_base[b, -1]
            own = sum(
                w * expert_output(experts, int(e), x_D)
                for e, w in zip(chosen[b], reference.topk_weight[b, -1], strict=True)
            )
            expected = scale * expert_output(experts, int(target[b]), x_D) - own
            torch.testing.assert_close(
                y_moved[b, -1] - y_base[b, -1], expected, rtol=1e-4, atol=1e-5
            )


@pytest.mark.parametrize(
    ("family", "config"),
    [
        ("mixtral", {}),
        ("olmoe", {}),  # norm_topk_prob=False
        ("qwen2_moe", {"norm_topk_prob": True}),
        ("qwen3_moe", {}),
        ("deepseek_v3", {"topk_group": 4}),  # all groups allowed; zero bias below
        ("deepseek_v3", {"topk_group": 4, "norm_topk_prob": False}),
    ],
)
def test_rerouted_weights_are_the_family_routers_own_at_its_own_distribution(family, config):
    """Every token changed by a factor 1 + 2⁻²⁰ (its top-K unchanged): the weights must be the
    ones the transformers router itself computed (renormalisation, DeepSeek-V3's
    routed_scaling_factor and, without norm_topk_prob, its raw sigmoid scores)."""
    model, input_ids = tiny_model(family, **config), batch()
    for block in moe_blocks(model):
        if family == "deepseek_v3":
            block.mlp.gate.e_score_correction_bias.zero_()  # selection = top-K of the scores
    routed = HFRouted(model)
    scaled = {i: (lambda p: p * (1 + 2**-20)) for i in range(routed.n_moe_layers())}
    with torch.no_grad():
        own = capture_routing(model, input_ids)
        with routed.override_routing(scaled):
            rerouted = capture_routing(model, input_ids)
    for layer, reference in zip(rerouted.layers, own.layers, strict=True):
        assert not torch.equal(layer.probs, reference.probs)  # every token was rerouted
        index, order = layer.topk_idx.sort(-1)
        reference_index, reference_order = reference.topk_idx.sort(-1)
        assert torch.equal(index, reference_index)
        torch.testing.assert_close(
            layer.topk_weight.gather(-1, order),
            reference.topk_weight.gather(-1, reference_order),
            rtol=1e-5,
            atol=1e-6,
        )


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradient_into_the_override_matches_finite_differences(variant):
    # float64 weights; the routers of Mixtral and DeepSeek-V3 and every RMSNorm still compute
    # in fp32, so the differences take a step of 1e-3 and a tolerance to match.
    routed, input_ids = routed_model(variant, torch.float64), batch(shape=(2, 5))
    with torch.no_grad():
        n_experts = routed.forward(input_ids).probs[0].shape[-1]
    z_BE = torch.randn(2, n_experts, generator=torch.Generator().manual_seed(3)).double()
    z_BE.requires_grad_(True)

    def loss(z: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with routed.override_routing({0: at_last_token(z.softmax(-1))}):
            output = routed.forward(input_ids)
        return output.logits[:, -1].logsumexp(-1).sum(), output.probs

    value, probs = loss(z_BE)
    # forward reports the new probabilities (in the router's dtype)
    assert torch.equal(probs[0][:, -1], z_BE.softmax(-1).to(probs[0].dtype))
    (gradient,) = torch.autograd.grad(value, [z_BE])
    # the experts each row routes to (whose weights carry the gradient), and one it does not
    coordinates = [(b, int(e)) for b in range(2) for e in z_BE[b].topk(2).indices]
    coordinates.append((0, int(z_BE[0].argmin())))
    assert max(abs(gradient[b, e].item()) for b, e in coordinates) > 1e-3
    step = 1e-3
    with torch.no_grad():
        for b, e in coordinates:
            plus, minus = z_BE.clone(), z_BE.clone()
            plus[b, e] += step
            minus[b, e] -= step
            finite_difference = (loss(plus)[0] - loss(minus)[0]).item() / (2 * step)
            assert finite_difference == pytest.approx(gradient[b, e].item(), rel=2e-3, abs=2e-4)


@pytest.mark.parametrize("variant", ["qwen2_moe", "qwen3_moe+softmax_topk"])
def test_context_validates_and_restores_routing_after_an_error(variant):
    routed, input_ids = routed_model(variant), batch()

    def hooks() -> list[tuple[list[int], list[int]]]:
        # A swapped gate carries transformers' output-capturing hook (swap_routers).
        return [
            (list(block.mlp._forward_pre_hooks), list(block.mlp.gate._forward_hooks))
            for block in moe_blocks(routed.model)
        ]

    before = hooks()
    assert all(not pre and len(post) == (variant != "qwen2_moe") for pre, post in before)
    with torch.no_grad():
        expected = routed.model(input_ids).logits
        n_experts = router_rows(moe_blocks(routed.model)[0].mlp.gate).shape[0]
        with pytest.raises(RuntimeError, match="inside"):
            with routed.override_routing({0: at_last_token(torch.eye(n_experts)[:2])}):
                assert not torch.equal(routed.model(input_ids).logits, expected)
                raise RuntimeError("inside")
        assert torch.equal(routed.model(input_ids).logits, expected)
        assert hooks() == before
        for block in moe_blocks(routed.model):
            if isinstance(block.mlp.gate, MoealignGate):
                assert block.mlp.gate.probs_override is None
        with pytest.raises(ValueError, match="overrides has layer 2; accepted: .* 0..1"):
            with routed.override_routing({2: lambda p: p}):
                pass
        with pytest.raises(ValueError, match=r"overrides\[1\] returned \(2, 7\); expected .*"):
            with routed.override_routing({1: lambda p: p[..., 0]}):
                routed.forward(input_ids)
        assert torch.equal(routed.model(input_ids).logits, expected)


# --- the RoMA pipeline on a Hugging Face model --------------------------------------------------

TOKENIZER = ByteTokenizer()
LAYERS = [1]  # of the two MoE layers: layer 0's router must stay as it is


@pytest.fixture(scope="module")
def questions():
    return task_questions(10)


def hf_routed_for_bytes() -> HFRouted:
    return HFRouted(tiny_model("qwen2_moe", vocab_size=TOKENIZER.vocab_size))


def neighbourhood_for(routed: HFRouted, questions):
    base = capture(routed, TOKENIZER, questions, LAYERS)
    embeddings = HashedTrigramEncoder().encode([q.prompt for q in questions])
    ids = torch.arange(len(questions))
    return base, find_neighbours(embeddings, embeddings, k=3, query_ids=ids, reference_ids=ids)


def test_roma_trains_only_the_chosen_layers_gate_weights(questions):
    routed = hf_routed_for_bytes()
    base, hood = neighbourhood_for(routed, questions)
    assert base.routing_NP.shape == (len(questions), 4)
    torch.testing.assert_close(base.routing_NP.sum(-1), torch.ones(len(questions)))
    before = {k: v.clone() for k, v in routed.model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in routed.model.named_parameters()}
    config = RouterTrainingConfig(
        lr=1e-2, epochs=1, batch_size=8, lambda_max=2.0, lambda_warmup_steps=0
    )
    log = train_routers(
        routed,
        TOKENIZER,
        questions,
        LAYERS,
        config,
        targets_NP=base.routing_NP,
        neighbourhood=hood,
    )
    assert len(log.ce) == 2 and log.lam == [2.0, 2.0]
    assert log.regularizer[1] > 0  # the manifold term was there, and λ > 0 weighted it
    after = routed.model.state_dict()
    trained = {f"model.layers.{layer}.mlp.gate.weight" for layer in LAYERS}
    for key, value in before.items():
        assert torch.equal(value, after[key]) != (key in trained), key
    assert flags == {n: p.requires_grad for n, p in routed.model.named_parameters()}


def test_c3po_on_a_hf_model_alpha_one_is_the_base_and_half_mixes(questions):
    routed = hf_routed_for_bytes()
    layers = [0, 1]
    base = capture(routed, TOKENIZER, questions, layers)
    generator = torch.Generator().manual_seed(5)
    references = torch.softmax(torch.randn(6, 2, 4, generator=generator), -1).flatten(1)
    index = torch.randint(0, 6, (len(questions), 3), generator=generator)
    weight = torch.softmax(torch.randn(len(questions), 3, generator=generator), -1)
    hood = Neighbourhood(index, weight)
    unchanged = c3po_capture(routed, TOKENIZER, questions, layers, hood, references, alpha=1.0)
    assert torch.equal(unchanged.routing_NP, base.routing_NP)
    assert torch.equal(unchanged.prediction_N, base.prediction_N)
    assert torch.equal(unchanged.gold_log_prob_N, base.gold_log_prob_N)
    # α = 0.5: r ← α r + (1 − α) Σ_j W_j r_j on the first chosen layer (whose input the
    # re-mixing cannot change), and the answers move.
    remixed = c3po_capture(routed, TOKENIZER, questions, layers, hood, references, alpha=0.5)
    mixture = (weight.unsqueeze(-1) * references[index]).sum(1)
    torch.testing.assert_close(mixture, neighbour_mixture(hood, references))
    expected = 0.5 * base.routing_NP[:, :4] + 0.5 * mixture[:, :4]
    torch.testing.assert_close(remixed.routing_NP[:, :4], expected, rtol=0, atol=1e-6)
    assert (remixed.gold_log_prob_N - base.gold_log_prob_N).abs().max() > 1e-4


def test_transformers_tokenizer_encodes_questions_for_roma():
    words = ["[UNK]", "<eos>", "A", "B", "C", *(f"w{i}" for i in range(10))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="<eos>")
    tokenizer = TransformersTokenizer(hf)
    assert (tokenizer.eos_id, tokenizer.pad_id, tokenizer.vocab_size) == (1, 1, 15)
    assert tokenizer.encode("w3 w1 B") == [8, 6, 3] == hf("w3 w1 B").input_ids
    assert tokenizer.decode([8, 1, 3]) == "w3 B"
    example = TaskExample("t", "w3 w1", "B", options=("w2", "w4", "w5"))
    question = encode_question(example, tokenizer)
    # one row, the prompt; the letters A, B, C are scored at its last position; gold B
    assert question.rows == [[8, 6]] and question.gold == 1 and question.routed_position == 1
    assert question.scored == [(0, 1, 2, 0), (0, 1, 3, 1), (0, 1, 4, 2)]
    hf.pad_token = "[UNK]"
    assert TransformersTokenizer(hf).pad_id == 0
    with pytest.raises(ValueError, match="eos_token_id=None"):
        TransformersTokenizer(PreTrainedTokenizerFast(tokenizer_object=backend))
