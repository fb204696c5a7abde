"""Merging (M-SMoE, Sub-MoE) against independent computations: numpy SVDs, known
permutations, identical experts, and the layers' own routing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers_compression import calibration_inputs, compress_layer, layer_calibration, make_layer
from moealign.compression import ExpertWeights
from moealign.compression.msmoe import msmoe_groups
from moealign.compression.permutation import match_hidden_units, permute_hidden_units
from moealign.compression.plan import merge_coefficients
from moealign.compression.submoe import joint_svd, subspace_merge


def _expert(seed: int, d_ff: int = 12, d_model: int = 16) -> ExpertWeights:
    generator = torch.Generator().manual_seed(seed)
    return ExpertWeights(
        torch.randn(d_ff, d_model, generator=generator),
        torch.randn(d_ff, d_model, generator=generator),
        torch.randn(d_model, d_ff, generator=generator),
    )


def _swiglu(expert: ExpertWeights, x: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ expert.gate.T) * (x @ expert.up.T)) @ expert.down.T


# --- permutation alignment ----------------------------------------------------------------------


def test_permuting_hidden_units_keeps_the_expert_function():
    expert, x = _expert(0), torch.randn(5, 16)
    permuted = permute_hidden_units(expert, torch.randperm(12))
    torch.testing.assert_close(_swiglu(permuted, x), _swiglu(expert, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("noise", [0.0, 0.05])
def test_alignment_recovers_a_known_permutation(noise):
    reference = _expert(1)
    shuffle = torch.randperm(12, generator=torch.Generator().manual_seed(2))
    shuffled = permute_hidden_units(reference, shuffle)  # unit a of it = unit shuffle[a] of ref
    generator = torch.Generator().manual_seed(3)
    noisy = ExpertWeights(
        *(w + noise * torch.randn(w.shape, generator=generator) for w in shuffled)
    )
    permutation = match_hidden_units(reference, noisy)
    # Unit a of the aligned expert must be reference unit a: noisy unit inverse(shuffle)[a].
    assert torch.equal(permutation, torch.argsort(shuffle))
    aligned = permute_hidden_units(noisy, permutation)
    torch.testing.assert_close(aligned.gate, reference.gate, atol=5 * noise + 1e-7, rtol=0)


# --- M-SMoE -------------------------------------------------------------------------------------


def test_msmoe_groups_around_dominant_experts_by_router_logit_similarity():
    layer = make_layer(8, 2, seed=5)
    x = calibration_inputs(300)
    with torch.no_grad():
        _, info = layer(x)
    counts = np.bincount(info.topk_idx.flatten().numpy(), minlength=8)
    dominants = sorted(np.argsort(-counts, kind="stable")[:3].tolist())
    logits = info.logits.double().numpy()
    unit = logits / np.linalg.norm(logits, axis=0, keepdims=True)
    similarity = (unit.T @ unit + 1) / 2
    expected = {d: [d] for d in dominants}
    for e in sorted(set(range(8)) - set(dominants)):
        expected[dominants[int(np.argmax(similarity[e, dominants]))]].append(e)
    groups = msmoe_groups(layer_calibration(layer, x), 3)
    assert groups == {d: sorted(m) for d, m in expected.items()}
    assert sorted(e for members in groups.values() for e in members) == list(range(8))


def _with_duplicates(layer, copies: dict[int, int], permute: bool):
    """Expert c becomes a copy of expert e (hidden units shuffled when ``permute``) with the
    same router row, for each c: e in ``copies``."""
    generator = torch.Generator().manual_seed(11)
    experts = layer.experts
    with torch.no_grad():
        for copy, source in copies.items():
            expert = ExpertWeights(
                experts.w_gate[source], experts.w_up[source], experts.w_down[source]
            )
            if permute:
                expert = permute_hidden_units(expert, torch.randperm(12, generator=generator))
            experts.w_gate[copy], experts.w_up[copy], experts.w_down[copy] = expert
            layer.router.weight[copy] = layer.router.weight[source]
    return layer


@pytest.mark.parametrize("method,permute", [("msmoe", True), ("msmoe", False), ("submoe", False)])
def test_merging_identical_experts_leaves_outputs_unchanged(method, permute):
    # Top-1: a token goes to its expert with weight 1, so merging an expert with its copies
    # (same function, same router row) must leave every output unchanged. M-SMoE must undo
    # a hidden-unit shuffle by its alignment; Sub-MoE does not align (copies are exact) and
    # runs at full rank here (its default truncation would change the experts).
    layer = _with_duplicates(make_layer(6, 1), {1: 0, 4: 0, 3: 2}, permute)
    x = calibration_inputs(200)
    options = {"rank": 1000} if method == "submoe" else {}
    compressed, groups = compress_layer(layer, method, 3, x, **options)
    assert groups == [(0, 1, 4), (2, 3), (5,)]
    with torch.no_grad():
        y, y_new = layer(x)[0], compressed(x)[0]
    # float64 merges of float32 weights: equal up to float32 rounding.
    torch.testing.assert_close(y_new, y, rtol=1e-5, atol=1e-5)
    # R2: every router row kept, each sending its gate to its group's expert.
    assert torch.equal(compressed.router.weight, layer.router.weight)
    assert compressed.expert_map.tolist() == [0, 0, 1, 1, 0, 2]


def _relative_error(y_new, y):
    return float((y_new - y).norm() / y.norm())


@pytest.mark.parametrize("method", ["msmoe", "submoe"])
def test_r2_keeps_routing_decisions_and_beats_r3_in_float64(method):
    """R2 (all E router rows, members share their group's merged expert) against R3 (one
    collapsed row per group) on a float64 layer: R2's top-k choices are the original's (the
    same rows score the same tokens), its output is Σ_k w_k · merged_{map[idx_k]}(x) by hand,
    and its relative output error is below R3's at 25% and 50% fewer experts."""
    from moealign.compression import build_compressed
    from moealign.compression.compress import plan_layer

    layer = make_layer(8, 2, seed=3).double()
    x = calibration_inputs(400).double()
    with torch.no_grad():
        y, info = layer(x)
    for keep in (6, 4):
        calibration = layer_calibration(layer, x)
        plan = plan_layer(method, calibration, keep)
        r2 = build_compressed(layer, [calibration.view], [plan])
        with torch.no_grad():
            y_r2, info_r2 = r2(x)
        assert torch.equal(info_r2.topk_idx, info.topk_idx)
        assert torch.equal(info_r2.topk_weight, info.topk_weight)
        mapping = plan.expert_map(8)
        by_hand = torch.zeros_like(y)
        for k in range(2):
            for g in range(keep):
                rows = mapping[info.topk_idx[:, k]] == g
                expert = ExpertWeights(*(w[g] for w in plan.experts))
                by_hand[rows] += info.topk_weight[rows, k, None] * _swiglu(expert, x[rows])
        torch.testing.assert_close(y_r2, by_hand, rtol=1e-10, atol=1e-12)
        # R3 by hand: one row per group, Σ f̂_e r_e, then top-k of the E′ rows.
        r3_rows = plan.collapse_rows(layer.router.weight.detach())
        probs = (x @ r3_rows.T).softmax(-1)
        weight, index = probs.topk(2, dim=-1)
        weight = weight / weight.sum(-1, keepdim=True)
        y_r3 = torch.zeros_like(y)
        for k in range(2):
            for g in range(keep):
                rows = index[:, k] == g
                expert = ExpertWeights(*(w[g] for w in plan.experts))
                y_r3[rows] += weight[rows, k, None] * _swiglu(expert, x[rows])
        assert _relative_error(y_r2, y) < _relative_error(y_r3, y)
        collapsed = build_compressed(layer, [calibration.view], [plan], collapse=True)
        with torch.no_grad():
            torch.testing.assert_close(collapsed(x)[0], y_r3, rtol=1e-10, atol=1e-12)


def test_a_merged_mpi_layer_drives_each_row_by_its_merged_expert():
    layer = make_layer(6, 2, seed=2, router="mpi")
    compressed, groups = compress_layer(layer, "msmoe", 4, calibration_inputs(120))
    expected = compressed.experts.w_gate[compressed.expert_map]
    assert torch.equal(compressed.router_drive_matrix(), expected)
    assert compressed.router.c_prime == layer.router.c_prime  # E rows kept: C unchanged


def test_msmoe_merge_is_the_frequency_weighted_average():
    from moealign.compression.compress import plan_layer

    layer = make_layer(6, 2, seed=7)
    x = calibration_inputs(300)
    compressed, groups = compress_layer(layer, "msmoe", 4, x)
    plan = plan_layer("msmoe", layer_calibration(layer, x), 4)
    collapsed = plan.collapse_rows(layer.router.weight.detach())  # R3 (transformers only)
    with torch.no_grad():
        counts = torch.bincount(layer(x)[1].topk_idx.flatten(), minlength=6).double()
    merged = [g for g in groups if len(g) > 1]
    assert merged
    assert torch.equal(compressed.router.weight, layer.router.weight)  # R2: rows kept
    for group in merged:
        index = groups.index(group)
        f = counts[list(group)] / counts[list(group)].sum()
        row = sum(f[i] * layer.router.weight[e].double() for i, e in enumerate(group))
        torch.testing.assert_close(collapsed[index].double(), row, rtol=1e-6, atol=1e-7)
        # Each member aligned to the dominant first: its down matrix enters permuted, so check
        # the permutation-invariant sum of the down matrix's columns, Σ_a down[:, a].
        down = sum(f[i] * layer.experts.w_down[e].double().sum(1) for i, e in enumerate(group))
        torch.testing.assert_close(
            compressed.experts.w_down[index].double().sum(1), down, rtol=1e-5, atol=1e-6
        )


def test_merge_coefficients_normalise_frequencies_within_the_group():
    f = torch.tensor([0.3, 0.1, 0.0, 0.0, 0.6])
    torch.testing.assert_close(
        merge_coefficients(f, [0, 1]), torch.tensor([0.75, 0.25], dtype=torch.float64)
    )
    torch.testing.assert_close(
        merge_coefficients(f, [2, 3]), torch.tensor([0.5, 0.5], dtype=torch.float64)
    )


# --- Sub-MoE ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(12, 16), (16, 12)])  # gate/up (F, D) and down (D, F)
def test_joint_svd_at_full_rank_reconstructs_every_expert(shape):
    generator = torch.Generator().manual_seed(0)
    matrices = [torch.randn(*shape, generator=generator) for _ in range(3)]
    u, s, blocks = joint_svd(matrices)
    for matrix, block in zip(matrices, blocks, strict=True):
        torch.testing.assert_close(u @ torch.diag(s) @ block, matrix.double(), rtol=0, atol=1e-12)
    coefficients = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    merged = subspace_merge([m.double() for m in matrices], coefficients, rank=1000)
    average = sum(c * m.double() for c, m in zip(coefficients, matrices, strict=True))
    torch.testing.assert_close(merged, average, rtol=0, atol=1e-12)  # §1.6: the plain average
    # The default truncation, k = ⌊12·16/28⌋ = 6: the average projected on U_6 by hand.
    truncated = subspace_merge([m.double() for m in matrices], coefficients)
    u6 = u[:, :6]
    torch.testing.assert_close(truncated, u6 @ u6.T @ average, rtol=0, atol=1e-12)


@pytest.mark.parametrize("rank", [1, 5])
def test_truncated_joint_svd_matches_a_direct_svd(rank):
    generator = torch.Generator().manual_seed(1)
    matrices = [torch.randn(12, 16, generator=generator, dtype=torch.float64) for _ in range(3)]
    coefficients = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    # numpy: the top-k left singular subspace of the concatenation, then project the average.
    u, _, _ = np.linalg.svd(np.concatenate([m.numpy() for m in matrices], axis=1))
    projector = u[:, :rank] @ u[:, :rank].T
    average = sum(c * m.numpy() for c, m in zip(coefficients.tolist(), matrices, strict=True))
    merged = subspace_merge(matrices, coefficients, rank)
    np.testing.assert_allclose(merged.numpy(), projector @ average, rtol=0, atol=1e-10)
    # One matrix: the rank-k truncation of its own SVD (Eckart–Young).
    u1, s1, vh1 = np.linalg.svd(matrices[0].numpy())
    alone = subspace_merge(matrices[:1], torch.ones(1, dtype=torch.float64), rank)
    np.testing.assert_allclose(alone.numpy(), (u1[:, :rank] * s1[:rank]) @ vh1[:rank], atol=1e-10)


def test_submoe_clusters_experts_with_the_same_outputs():
    layer = _with_duplicates(make_layer(6, 2, seed=2), {3: 0, 5: 1, 4: 2}, permute=False)
    x = calibration_inputs(150)
    compressed, groups = compress_layer(layer, "submoe", 3, x, seed=4, rank=1000)
    assert groups == [(0, 3), (1, 5), (2, 4)]
    for index, group in enumerate(groups):  # copies merge to themselves (at full rank)
        torch.testing.assert_close(compressed.experts.w_up[index], layer.experts.w_up[group[0]])


def test_submoe_rank_truncates_every_expert():
    layer = make_layer(6, 2)
    x = calibration_inputs()
    full, groups = compress_layer(layer, "submoe", 3, x, rank=1000)
    truncated, same_groups = compress_layer(layer, "submoe", 3, x, rank=2)
    default, default_groups = compress_layer(layer, "submoe", 3, x)
    assert groups == same_groups == default_groups
    merged = [i for i, g in enumerate(groups) if len(g) > 1]
    single = [i for i, g in enumerate(groups) if len(g) == 1]
    assert merged
    for weight in ("w_gate", "w_up", "w_down"):
        # Stored in float32: singular values below float32 rounding count as zero.
        ranks = torch.linalg.matrix_rank(getattr(truncated.experts, weight), rtol=1e-5)
        assert ranks[merged].tolist() == [2] * len(merged)
        assert torch.linalg.matrix_rank(getattr(full.experts, weight), rtol=1e-5).min() > 2
        # The default truncation: ⌊d_out·d_in/(d_out + d_in)⌋ (16×12 or 12×16 here: 6).
        ranks = torch.linalg.matrix_rank(getattr(default.experts, weight), rtol=1e-5)
        assert ranks[merged].tolist() == [6] * len(merged)
        for i in single:  # a cluster of one is not merged: kept whole
            kept = getattr(default.experts, weight)[i]
            assert torch.equal(kept, getattr(layer.experts, weight)[groups[i][0]])
