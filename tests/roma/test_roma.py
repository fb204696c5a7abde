"""RoMA, C3PO and oracle routing (DESIGN.md §5), each checked against an independent
computation: float64 finite differences, brute-force neighbour search, hand-computed kernel
weights and mixtures, single-example scoring, and bit-for-bit comparisons of weights."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from helpers_questions import task_questions
from helpers_saturated import saturated_logits
from moealign.config import ConfigError
from moealign.data.tokenizer import ByteTokenizer
from moealign.evaluation.multiple_choice import option_log_likelihoods
from moealign.nn.routed import MoealignRouted
from moealign.nn.transformer import ModelConfig, MoETransformer
from moealign.roma import (
    HashedTrigramEncoder,
    Neighbourhood,
    RomaConfig,
    RouterTrainingConfig,
    c3po_capture,
    c3po_ngd_capture,
    capture,
    descend_core_routing,
    encode_question,
    find_neighbours,
    lambda_at,
    load_roma_config,
    manifold_loss,
    neighbour_mixture,
    oracle_capture,
    oracle_tuning,
    routing_entropy,
    train_routers,
)
from moealign.roma.choices import collate, option_scores, replace_at_positions, routing_vector

TOKENIZER = ByteTokenizer()
LAYERS = [1, 2]


def tiny_model(dtype=torch.float32, seed=0) -> MoETransformer:
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=TOKENIZER.vocab_size,
        d_model=32,
        n_layers=3,
        n_heads=2,
        max_seq_len=128,
        n_experts=4,
        top_k=2,
        expert_d_ff=16,
        init_std=0.3,  # large enough that routing visibly moves the answer
    )
    return MoETransformer(config).to(dtype).eval()


@pytest.fixture(scope="module")
def questions():
    return task_questions(14)


# --- the routing override hook ---------------------------------------------------------------


def test_override_reroutes_changed_tokens_and_keeps_the_rest():
    torch.manual_seed(0)
    model = tiny_model()
    layer = model.moe_layers[0]
    x_BSD = torch.randn(2, 5, 32)
    y_ref, info_ref = layer(x_BSD)
    new_E = torch.tensor([0.1, 0.2, 0.3, 0.4])

    def override(probs_BSE):
        out = probs_BSE.clone()
        out[1, 3] = new_E
        return out

    layer.probs_override = override
    y, info = layer(x_BSD)
    layer.probs_override = None
    changed = 1 * 5 + 3
    keep = [t for t in range(10) if t != changed]
    # The router runs before the override on the same input: its decisions are the same bits.
    assert torch.equal(info.topk_idx[keep], info_ref.topk_idx[keep])
    assert torch.equal(info.topk_weight[keep], info_ref.topk_weight[keep])
    # Experts 2 and 3 now get one row more, and a GEMM of another row count may block its
    # sums differently (MKL's AVX2 kernels do): fp32 rounding (ε ≈ 1.2e-7) on outputs of O(1).
    torch.testing.assert_close(y.view(10, -1)[keep], y_ref.view(10, -1)[keep], rtol=1e-5, atol=1e-6)
    # The changed token: top-2 of the new probabilities, weights renormalised over the two.
    assert sorted(info.topk_idx[changed].tolist()) == [2, 3]
    order = info.topk_idx[changed].argsort()
    assert torch.allclose(info.topk_weight[changed][order], torch.tensor([3 / 7, 4 / 7]))
    experts = layer.experts
    x_D = x_BSD[1, 3]

    def expert(e):
        hidden = torch.nn.functional.silu(experts.w_gate[e] @ x_D) * (experts.w_up[e] @ x_D)
        return experts.w_down[e] @ hidden

    expected = 3 / 7 * expert(2) + 4 / 7 * expert(3)
    assert torch.allclose(y[1, 3], expected, atol=1e-5)


def test_override_routing_context_validates_and_restores():
    routed = MoealignRouted(tiny_model())
    with pytest.raises(ValueError, match="overrides has layer 7"):
        with routed.override_routing({7: lambda p: p}):
            pass
    with pytest.raises(RuntimeError):
        with routed.override_routing({0: lambda p: p}):
            assert routed.model.moe_layers[0].probs_override is not None
            raise RuntimeError
    assert all(layer.probs_override is None for layer in routed.model.moe_layers)


# --- scoring ---------------------------------------------------------------------------------


def test_letter_scores_match_one_question_at_a_time(questions):
    routed = MoealignRouted(tiny_model())
    encoded = [encode_question(q, TOKENIZER) for q in questions[:6]]
    batch = collate(encoded, TOKENIZER.pad_id)
    with torch.no_grad():
        scores_BO = option_scores(routed.forward(batch.input_ids_RS), batch)
        for b, question in enumerate(questions[:6]):
            # The prompt, then " " (shared by " A", " B", ...): the next token is the letter.
            ids = torch.tensor([TOKENIZER.encode(question.prompt + " ")])
            log_probs = routed.model(ids).logits[0, -1].log_softmax(-1)
            letters = [TOKENIZER.encode(chr(65 + o))[0] for o in range(len(question.options))]
            expected = log_probs[letters]
            assert torch.allclose(scores_BO[b, : len(letters)], expected, atol=1e-5)
            assert torch.isinf(scores_BO[b, len(letters) :]).all()
            assert batch.routed_position_B[b] == len(TOKENIZER.encode(question.prompt)) - 1


def test_text_scores_match_option_log_likelihoods(questions):
    model = tiny_model()
    routed = MoealignRouted(model)
    chosen = questions[:5] + questions[-3:]  # 4-option and 2-option (brackets) questions
    batch = collate(
        [encode_question(q, TOKENIZER, continuation="text") for q in chosen], TOKENIZER.pad_id
    )
    with torch.no_grad():
        scores_BO = option_scores(routed.forward(batch.input_ids_RS), batch)
    expected = option_log_likelihoods(model, TOKENIZER, chosen, continuation="text")
    for b, row in enumerate(expected):
        assert torch.allclose(scores_BO[b, : len(row)], torch.tensor(row).float(), atol=1e-4)
        assert torch.isinf(scores_BO[b, len(row) :]).all()
    # every row of a question starts with its prompt, so their routing agrees at the prompt
    with torch.no_grad():
        output = routed.forward(batch.input_ids_RS)
    for layer in LAYERS:
        at_R = output.probs[layer][torch.arange(len(batch.question_R)), batch.routed_position_R]
        first_R = at_R[batch.first_row_B][batch.question_R]
        assert torch.allclose(at_R, first_R, atol=1e-6)


# --- neighbours ------------------------------------------------------------------------------


def test_knn_excludes_self_and_matches_brute_force():
    generator = torch.Generator().manual_seed(1)
    embeddings = torch.nn.functional.normalize(torch.randn(12, 5, generator=generator), dim=-1)
    success = torch.tensor([0, 2, 3, 5, 7, 8, 11])
    sigma = 0.7
    hood = find_neighbours(
        embeddings,
        embeddings[success],
        k=3,
        sigma=sigma,
        query_ids=torch.arange(12),
        reference_ids=success,
    )
    e = embeddings.double().numpy()
    for i in range(12):
        candidates = [j for j in success.tolist() if j != i]
        distance2 = {j: float(((e[i] - e[j]) ** 2).sum()) for j in candidates}
        nearest = sorted(candidates, key=distance2.get)[:3]
        chosen = success[hood.index_QK[i]].tolist()
        assert i not in chosen
        assert sorted(chosen) == sorted(nearest)
        kernel = np.array([math.exp(-distance2[j] / (2 * sigma**2)) for j in chosen])
        assert np.allclose(hood.weight_QK[i].numpy(), kernel / kernel.sum(), atol=1e-6)
    assert torch.allclose(hood.weight_QK.sum(-1), torch.ones(12))


def test_epsilon_ball_and_random_neighbours():
    generator = torch.Generator().manual_seed(2)
    embeddings = torch.nn.functional.normalize(torch.randn(10, 4, generator=generator), dim=-1)
    ids = torch.arange(10)
    sigma, epsilon = 0.6, 0.3
    hood = find_neighbours(
        embeddings,
        embeddings,
        mode="epsilon",
        epsilon=epsilon,
        sigma=sigma,
        query_ids=ids,
        reference_ids=ids,
    )
    kernel = torch.exp(
        -(torch.cdist(embeddings.double(), embeddings.double()) ** 2) / (2 * sigma**2)
    )
    for i in range(10):
        expected = {j for j in range(10) if j != i and kernel[i, j] >= epsilon}
        chosen = {j for j in hood.index_QK[i].tolist() if j >= 0}
        assert chosen == expected
        total = float(hood.weight_QK[i].sum())
        assert total == pytest.approx(1.0 if expected else 0.0, abs=1e-6)
    random_hood = find_neighbours(
        embeddings,
        embeddings,
        mode="random",
        k=4,
        query_ids=ids,
        reference_ids=ids,
        generator=torch.Generator().manual_seed(0),
    )
    assert (random_hood.index_QK != ids.view(-1, 1)).all()
    assert torch.allclose(random_hood.weight_QK.sum(-1), torch.ones(10))
    with pytest.raises(ValueError, match="mode='nearest'"):
        find_neighbours(embeddings, embeddings, mode="nearest")


def test_builtin_encoder_puts_same_task_prompts_closer(questions):
    encoder = HashedTrigramEncoder()
    e = encoder.encode([q.prompt for q in questions])
    assert torch.allclose(e.norm(dim=-1), torch.ones(len(questions)))
    assert torch.equal(e, encoder.encode([q.prompt for q in questions]))
    similarity = e @ e.T
    tasks = [q.task for q in questions]
    same = [
        similarity[i, j] for i in range(20) for j in range(20) if i != j and tasks[i] == tasks[j]
    ]
    other = [similarity[i, j] for i in range(20) for j in range(20) if tasks[i] != tasks[j]]
    assert min(same) > max(other)


# --- training --------------------------------------------------------------------------------


def _neighbourhood_for(routed, questions):
    base = capture(routed, TOKENIZER, questions, LAYERS)
    embeddings = HashedTrigramEncoder().encode([q.prompt for q in questions])
    ids = torch.arange(len(questions))
    hood = find_neighbours(embeddings, embeddings, query_ids=ids, reference_ids=ids)
    return base.routing_NP, hood


def test_only_router_parameters_change(questions):
    routed = MoealignRouted(tiny_model())
    targets, hood = _neighbourhood_for(routed, questions)
    before = {k: v.clone() for k, v in routed.model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in routed.model.named_parameters()}
    config = RouterTrainingConfig(lr=1e-2, epochs=1, batch_size=8, lambda_warmup_steps=0)
    train_routers(
        routed, TOKENIZER, questions, LAYERS, config, targets_NP=targets, neighbourhood=hood
    )
    after = routed.model.state_dict()
    router_keys = {f"blocks.{i}.ffn.router.weight" for i in LAYERS}
    for key, value in before.items():
        if key in router_keys:
            assert not torch.equal(value, after[key]), key
        else:
            assert torch.equal(value, after[key]), key
    assert flags == {n: p.requires_grad for n, p in routed.model.named_parameters()}


def test_manifold_gradient_matches_float64_finite_difference(questions):
    model = tiny_model(torch.float64)
    routed = MoealignRouted(model)
    batch = collate([encode_question(q, TOKENIZER) for q in questions[:4]], TOKENIZER.pad_id)
    generator = torch.Generator().manual_seed(3)
    targets_BKP = torch.softmax(
        torch.randn(4, 3, 2, 4, generator=generator, dtype=torch.float64), -1
    )
    targets_BKP = targets_BKP.flatten(2)
    weight_BK = torch.softmax(torch.randn(4, 3, generator=generator, dtype=torch.float64), -1)
    router = model.moe_layers[1].router.weight

    def loss() -> torch.Tensor:
        output = routed.forward(batch.input_ids_RS)
        routing_BP = routing_vector(output, LAYERS, batch)
        return manifold_loss(routing_BP, targets_BKP, weight_BK)

    (gradient,) = torch.autograd.grad(loss(), [router])
    assert gradient.abs().max() > 1e-6
    step = 1e-6
    with torch.no_grad():
        for e, d in [(0, 0), (1, 5), (2, 17), (3, 31)]:
            original = router[e, d].item()
            router[e, d] = original + step
            plus = loss().item()
            router[e, d] = original - step
            minus = loss().item()
            router[e, d] = original
            finite_difference = (plus - minus) / (2 * step)
            assert finite_difference == pytest.approx(gradient[e, d].item(), rel=1e-5, abs=1e-9)


def test_manifold_loss_by_hand():
    routing_BP = torch.tensor([[0.5, 0.5, 1.0, 0.0]])
    targets_BKP = torch.tensor([[[1.0, 0.0, 1.0, 0.0], [0.5, 0.5, 0.0, 1.0]]])
    weight_BK = torch.tensor([[0.25, 0.75]])
    # ‖r − r1‖² = 0.5, ‖r − r2‖² = 2.
    assert manifold_loss(routing_BP, targets_BKP, weight_BK).item() == pytest.approx(
        0.25 * 0.5 + 0.75 * 2.0
    )
    assert lambda_at(5, 0.8, 20) == pytest.approx(0.2) and lambda_at(50, 0.8, 20) == 0.8


def test_lambda_zero_roma_equals_router_tuning(questions):
    routed = MoealignRouted(tiny_model())
    targets, hood = _neighbourhood_for(routed, questions)
    start = copy.deepcopy(routed.model.state_dict())
    config = RouterTrainingConfig(lr=1e-2, epochs=2, batch_size=8, lambda_max=0.0)
    roma_log = train_routers(
        routed, TOKENIZER, questions, LAYERS, config, targets_NP=targets, neighbourhood=hood, seed=4
    )
    roma_state = copy.deepcopy(routed.model.state_dict())
    routed.model.load_state_dict(start)
    tuning = RouterTrainingConfig(lr=1e-2, epochs=2, batch_size=8, regularizer="none")
    train_routers(routed, TOKENIZER, questions, LAYERS, tuning, seed=4)
    assert max(roma_log.regularizer) > 0  # the term was there, weighted by zero
    for key, value in roma_state.items():
        assert torch.equal(value, routed.model.state_dict()[key]), key
    # and a positive λ does train differently
    routed.model.load_state_dict(start)
    train_routers(
        routed,
        TOKENIZER,
        questions,
        LAYERS,
        RouterTrainingConfig(lr=1e-2, epochs=2, batch_size=8, lambda_max=5.0),
        targets_NP=targets,
        neighbourhood=hood,
        seed=4,
    )
    assert not torch.equal(
        roma_state["blocks.2.ffn.router.weight"], routed.model.blocks[2].ffn.router.weight
    )


@pytest.mark.parametrize("regularizer", ["l1", "l2", "entropy"])
def test_ablation_regularizers_train(questions, regularizer):
    routed = MoealignRouted(tiny_model())
    config = RouterTrainingConfig(regularizer=regularizer, lr=1e-2, epochs=1, batch_size=10)
    log = train_routers(routed, TOKENIZER, questions, LAYERS, config)
    assert len(log.ce) == 2
    if regularizer == "entropy":
        assert 0 < log.regularizer[0] <= len(LAYERS) * math.log(4) + 1e-6
    else:
        assert log.regularizer[0] == 0.0 and log.regularizer[1] > 0.0  # change from θ_0


def test_entropy_regularizer_is_finite_at_exact_zero_routing_probabilities():
    logits = saturated_logits(n_tokens=6, n_experts=4).view(3, 2, 4).requires_grad_(True)
    logits64 = logits.detach().double().requires_grad_(True)
    value = routing_entropy(torch.softmax(logits, -1))
    probs64 = torch.softmax(logits64, -1)
    value64 = -(probs64 * probs64.log()).sum(-1).sum(-1).mean()
    value.backward()
    value64.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()
    torch.testing.assert_close(value.double(), value64, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits.grad.double(), logits64.grad, rtol=1e-5, atol=1e-6)


# --- C3PO and the oracle ---------------------------------------------------------------------


def test_c3po_alpha_one_leaves_routing_unchanged_and_mixes_otherwise(questions):
    routed = MoealignRouted(tiny_model())
    base = capture(routed, TOKENIZER, questions, LAYERS)
    generator = torch.Generator().manual_seed(5)
    references = torch.softmax(torch.randn(6, 2, 4, generator=generator), -1).flatten(1)
    index = torch.randint(0, 6, (len(questions), 3), generator=generator)
    hood = Neighbourhood(
        index, torch.softmax(torch.randn(len(questions), 3, generator=generator), -1)
    )
    unchanged = c3po_capture(routed, TOKENIZER, questions, LAYERS, hood, references, alpha=1.0)
    assert torch.equal(unchanged.routing_NP, base.routing_NP)
    assert torch.equal(unchanged.prediction_N, base.prediction_N)
    # α = 0.5, last layer: r ← α r + (1 − α) Σ_j W_j r_j at the routed token. (The first chosen
    # layer's re-mixing changes the input of the next, so check the first layer exactly.)
    remixed = c3po_capture(routed, TOKENIZER, questions, LAYERS, hood, references, alpha=0.5)
    mixture = (hood.weight_QK.unsqueeze(-1) * references[index]).sum(1)
    assert torch.allclose(mixture, neighbour_mixture(hood, references))
    expected = 0.5 * base.routing_NP[:, :4] + 0.5 * mixture[:, :4]
    assert torch.allclose(remixed.routing_NP[:, :4], expected, atol=1e-6)


def test_oracle_routing_beats_base_and_changes_no_weight(questions):
    routed = MoealignRouted(tiny_model())
    before = {k: v.clone() for k, v in routed.model.state_dict().items()}
    base = capture(routed, TOKENIZER, questions, LAYERS)
    oracle = oracle_capture(routed, TOKENIZER, questions, LAYERS, steps=30, lr=0.5)
    # Descent on each question's own CE: the gold option's probability never falls.
    assert (oracle.gold_log_prob_N >= base.gold_log_prob_N - 1e-6).all()
    assert (oracle.gold_log_prob_N - base.gold_log_prob_N).mean() > 1e-3
    assert oracle.correct_N.sum() >= base.correct_N.sum()
    assert not torch.allclose(oracle.routing_NP, base.routing_NP)
    assert all(torch.equal(v, routed.model.state_dict()[k]) for k, v in before.items())


def test_core_routing_descent_on_a_toy_objective_moves_only_core_experts():
    """C3PO's NGD step on a toy loss: ‖ω − target‖², the target putting 0.35 on expert 3,
    outside the 2 core experts of the first row. Only the core experts' weights move, keeping
    their total mass; the loss falls as far as that restriction allows."""
    own_BLE = torch.tensor([[[0.5, 0.3, 0.15, 0.05]], [[0.1, 0.2, 0.3, 0.4]]])
    target_BLE = torch.tensor([[[0.05, 0.55, 0.05, 0.35]], [[0.7, 0.1, 0.1, 0.1]]])

    def loss_fn(routing_BLE):
        return (routing_BLE - target_BLE).square().sum()

    routing_BLE = descend_core_routing(own_BLE, loss_fn, steps=300, lr=3.0, core_experts=2)
    core_BLE = torch.tensor([[[True, True, False, False]], [[False, False, True, True]]])
    assert torch.equal(routing_BLE[~core_BLE], own_BLE[~core_BLE])  # bit for bit
    torch.testing.assert_close(routing_BLE.sum(-1), own_BLE.sum(-1))
    assert loss_fn(routing_BLE) < loss_fn(own_BLE)
    # The restricted optimum by hand: row 1 splits its core mass 0.8 as argmin_a (a − 0.05)² +
    # (0.8 − a − 0.55)², a = 0.15; row 2's 0.7 as argmin_c (c − 0.1)² + (0.7 − c − 0.1)², c = 0.35.
    expected = torch.tensor([[[0.15, 0.65, 0.15, 0.05]], [[0.1, 0.2, 0.35, 0.35]]])
    torch.testing.assert_close(routing_BLE, expected, atol=2e-3, rtol=0)
    # Every expert in the core: the plain routing descent of the oracle reaches the target.
    free = descend_core_routing(
        own_BLE, loss_fn, steps=400, lr=0.1, core_experts=None, optimizer="adam"
    )
    torch.testing.assert_close(free, target_BLE, atol=2e-3, rtol=0)


def test_ngd_takes_plain_gradient_steps_checked_in_float64_by_hand():
    """C3PO's NGD is plain gradient descent on the core logits z (C3PO): one step on a linear
    loss L(ω) = Σ a·ω is, by hand, ∂L/∂z_c = m·s_c·(a_c − Σ_core s·a) with s = softmax(z_core)
    and m the core mass, z ← z − η ∂L/∂z; non-core experts keep their weight bit for bit."""
    own = np.array([[0.45, 0.3, 0.15, 0.1], [0.05, 0.6, 0.1, 0.25]])
    a = np.array([[1.0, -2.0, 0.5, 3.0], [0.3, 1.0, -1.0, 2.0]])
    lr, core = 0.7, 2
    expected = own.copy()
    for row in range(2):
        c = np.argsort(-own[row])[:core]
        m = own[row, c].sum()
        z = np.log(own[row, c])
        s = np.exp(z) / np.exp(z).sum()
        z = z - lr * m * s * (a[row, c] - (s * a[row, c]).sum())
        expected[row, c] = m * np.exp(z) / np.exp(z).sum()
    own_BLE = torch.tensor(own).unsqueeze(1)
    a_BLE = torch.tensor(a).unsqueeze(1)
    got = descend_core_routing(own_BLE, lambda w: (a_BLE * w).sum(), 1, lr, core_experts=core)
    np.testing.assert_allclose(got.squeeze(1).numpy(), expected, rtol=0, atol=1e-13)
    outside = torch.tensor([[False, False, True, True], [True, False, True, False]]).unsqueeze(1)
    assert torch.equal(got[outside], own_BLE[outside])


def test_ngd_step_scales_with_the_loss():
    """Plain gradient descent: the loss scaled by c with step size η moves the routing exactly
    as the loss with step size c·η (Adam's per-coordinate rescaling would make the loss scale
    almost irrelevant: c = 1e-3 would then move ω as far as c = 1)."""
    torch.manual_seed(0)
    own_BLE = torch.rand(3, 2, 5, dtype=torch.float64).softmax(-1)
    target_BLE = torch.rand(3, 2, 5, dtype=torch.float64).softmax(-1)

    def loss(scale):
        return lambda w: scale * (w - target_BLE).square().sum()

    small = descend_core_routing(own_BLE, loss(1e-3), 3, 2.0, core_experts=3)
    rescaled = descend_core_routing(own_BLE, loss(1.0), 3, 2e-3, core_experts=3)
    torch.testing.assert_close(small, rescaled, rtol=0, atol=1e-14)
    full = descend_core_routing(own_BLE, loss(1.0), 3, 2.0, core_experts=3)
    moved_small = (small - own_BLE).abs().max()
    moved_full = (full - own_BLE).abs().max()
    assert moved_small < 0.01 * moved_full


def _neighbour_loss(routed, references, hood, routing_QP):
    """Σ_j W_qj CE_j(ω_q) per test question q: each neighbour j answered with q's routing ω_q at
    its routed token (through capture and the override hook, independently of the NGD code)."""
    losses = torch.zeros(len(hood.index_QK))
    for q in range(len(hood.index_QK)):
        pairs = zip(hood.index_QK[q].tolist(), hood.weight_QK[q].tolist(), strict=True)
        chosen = [(j, w) for j, w in pairs if j >= 0]
        examples = [references[j] for j, _ in chosen]
        routing_LE = routing_QP[q].view(len(LAYERS), -1)

        def overrides_for(rows, batch, routing_LE=routing_LE):
            def fixed(slot):
                return replace_at_positions(
                    batch, lambda current: routing_LE[slot].expand_as(current)
                )

            return {layer: fixed(slot) for slot, layer in enumerate(LAYERS)}

        result = capture(routed, TOKENIZER, examples, LAYERS, overrides_for=overrides_for)
        losses[q] = -sum(
            w * lp for (_, w), lp in zip(chosen, result.gold_log_prob_N.tolist(), strict=True)
        )
    return losses


def test_c3po_ngd_lowers_the_neighbour_loss_and_moves_only_core_experts(questions):
    routed = MoealignRouted(tiny_model())
    before = {k: v.clone() for k, v in routed.model.state_dict().items()}
    tests, references = questions[:6], questions[6:]
    base = capture(routed, TOKENIZER, tests, LAYERS)
    embed = HashedTrigramEncoder().encode
    hood = find_neighbours(embed([q.prompt for q in tests]), embed([q.prompt for q in references]))
    ngd = c3po_ngd_capture(
        routed, TOKENIZER, tests, LAYERS, hood, references, steps=10, lr=5.0, core_experts=2
    )
    assert all(torch.equal(v, routed.model.state_dict()[k]) for k, v in before.items())
    # The first chosen layer (its input does not depend on the re-mixing): non-core experts
    # keep their base weight bit for bit, the core experts' total is kept, and it moved.
    first_base, first_ngd = base.routing_NP[:, :4], ngd.routing_NP[:, :4]
    core = torch.zeros_like(first_base, dtype=torch.bool)
    core.scatter_(-1, first_base.topk(2, dim=-1).indices, True)
    assert torch.equal(first_ngd[~core], first_base[~core])
    torch.testing.assert_close(first_ngd.sum(-1), first_base.sum(-1))
    assert not torch.allclose(first_ngd, first_base)
    # The surrogate objective: the kernel-weighted loss of the neighbours under ω_q fell.
    base_loss = _neighbour_loss(routed, references, hood, base.routing_NP)
    ngd_loss = _neighbour_loss(routed, references, hood, ngd.routing_NP)
    assert (ngd_loss < base_loss).all()


def test_oracle_tuning_reaches_base_accuracy_on_its_training_questions(questions):
    routed = MoealignRouted(tiny_model())
    base = capture(routed, TOKENIZER, questions, LAYERS)
    oracle = oracle_capture(routed, TOKENIZER, questions, LAYERS, steps=30, lr=0.5)
    # The oracle's objective (the gold option's log-probability) improves; whether that flips
    # an answer of this untrained model depends on the CPU's kernels, so accuracy is >= only.
    assert oracle.gold_log_prob_N.sum() > base.gold_log_prob_N.sum()
    assert oracle.correct_N.sum() >= base.correct_N.sum()
    before = {k: v.clone() for k, v in routed.model.state_dict().items()}
    config = RouterTrainingConfig(lr=1e-2, epochs=5, batch_size=8)
    log = oracle_tuning(routed, TOKENIZER, questions, LAYERS, oracle.routing_NP, config, seed=0)
    tuned = capture(routed, TOKENIZER, questions, LAYERS)
    assert tuned.correct_N.sum() >= base.correct_N.sum()
    # The objective is ‖r_i(θ) − r_i*‖² alone (λ = 1 from the first step, no CE term), and only
    # the chosen routers moved.
    assert log.lam == [1.0] * len(log.lam)
    first = (base.routing_NP - oracle.routing_NP).square().sum(-1).mean()
    last = (tuned.routing_NP - oracle.routing_NP).square().sum(-1).mean()
    assert last < first
    router_keys = {f"blocks.{i}.ffn.router.weight" for i in LAYERS}
    for key, value in before.items():
        assert torch.equal(value, routed.model.state_dict()[key]) != (key in router_keys), key


# --- config ----------------------------------------------------------------------------------


def test_config_loads_and_names_bad_fields(tmp_path):
    from helpers_cli import CONFIGS

    config = load_roma_config(CONFIGS / "roma.toml")
    assert config.k == 3 and config.layers is None and config.seeds == (0, 1, 2)
    assert RomaConfig().layer_indices(3) == [0, 1, 2]  # the default: last 5, or all of fewer
    assert RomaConfig().layer_indices(7) == [2, 3, 4, 5, 6]
    with pytest.raises(ConfigError, match="layers: got 5, but the base model has 3 MoE layers"):
        RomaConfig(layers=5).layer_indices(3)
    assert RomaConfig(layers=2).layer_indices(4) == [2, 3]
    assert RomaConfig(layers="all").layer_indices(4) == [0, 1, 2, 3]
    assert load_roma_config(None, ['layers="all"', "k=5"]).k == 5
    assert config.methods == (
        "router_tuning",
        "roma",
        "oracle_tuning",
        "c3po",
        "c3po_ngd",
        "oracle",
    )
    assert load_roma_config(None, ['methods=["oracle", "roma"]']).methods == ("oracle", "roma")
    for override, fragment in [
        ("k=0", "k"),
        ("layers=0", "layers"),
        ("regularizer=l3", "regularizer"),
        ("seeds=[]", "seeds"),
        ("c3po_alpha=1.5", "c3po_alpha"),
        ("sigmaa=1", "sigmaa"),
        ("methods=[]", "methods"),
        ('methods=["roma", "roma"]', "methods"),
        ('methods=["base"]', "methods"),
    ]:
        with pytest.raises(ConfigError, match=fragment):
            load_roma_config(None, [override])


def test_minilm_encoder_loads_offline_and_embeds(questions):
    from moealign.roma import MiniLMEncoder

    e = MiniLMEncoder(device="cpu").encode([q.prompt for q in questions[:4]] + ["a cat sat"])
    assert e.shape == (5, 384) and e.dtype == torch.float32
    assert torch.allclose(e.norm(dim=-1), torch.ones(5), atol=1e-5)
    # two addition questions are closer to each other than to an unrelated sentence
    assert e[0] @ e[1] > e[0] @ e[4]
