"""Pruning (frequency, NAEE) and the identity of keeping every expert, on single MoE layers,
against independent computations: the layers' own forward passes and hand-worked routing."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from helpers_compression import (
    D_MODEL,
    calibration_inputs,
    compress_layer,
    layer_calibration,
    make_layer,
)
from moealign.compression import METHODS, build_compressed
from moealign.compression.plan import prune_plan
from moealign.compression.pruning import frequency_keep, naee_keep, reconstruction_error

ROUTERS = {
    "softmax_topk": dict(router="softmax_topk"),
    "switch": dict(router="switch", top_k=1),
    "mpi": dict(router="mpi"),
    "expert_bias": dict(router="softmax_topk", expert_bias=True),
    "shared_expert": dict(router="softmax_topk", shared_d_ff=8, normalize_topk=False),
}


def _layer(name: str, n_experts: int = 6):
    options = dict(ROUTERS[name])
    top_k = options.pop("top_k", 2)
    layer = make_layer(n_experts, top_k, **options)
    if layer.router.expert_bias is not None:
        layer.router.expert_bias.normal_(std=0.5)
    return layer


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("method", METHODS)
def test_keeping_every_expert_is_the_identity(method, router):
    layer = _layer(router)
    x = calibration_inputs()
    compressed, groups = compress_layer(layer, method, 6, x)
    assert groups == [(e,) for e in range(6)]
    # Same kernels, same shapes, same weights: bit-equal outputs and routing.
    with torch.no_grad():
        y, info = layer(x)
        y_new, info_new = compressed(x)
    assert torch.equal(y, y_new)
    assert torch.equal(info.logits, info_new.logits)
    assert torch.equal(info.topk_idx, info_new.topk_idx)


def test_frequency_pruning_removes_exactly_the_least_routed_experts():
    # Hand-worked routing: router row e is 10·(unit vector e) and a token a + 0.5·b routes
    # top-2 to {a, b}. The token list gives slot counts [5, 1, 4, 0, 3, 3] over 6 experts.
    layer = make_layer(6, 2)
    with torch.no_grad():
        layer.router.weight.copy_(10 * torch.eye(6, D_MODEL))
    pairs = [(0, 2)] * 3 + [(0, 4), (0, 5), (2, 1), (4, 5), (4, 5)]
    basis = torch.eye(D_MODEL)
    x = torch.stack([basis[a] + 0.5 * basis[b] for a, b in pairs])
    counts = torch.bincount(layer(x)[1].topk_idx.flatten(), minlength=6).tolist()
    assert counts == [5, 1, 4, 0, 3, 3]
    calibration = layer_calibration(layer, x)
    assert frequency_keep(calibration, 4) == [0, 2, 4, 5]  # drops expert 3 (0) and expert 1 (1)
    assert frequency_keep(calibration, 3) == [0, 2, 4]  # a tie of 3 and 3: the lower index stays
    torch.testing.assert_close(
        calibration.frequencies, torch.tensor(counts, dtype=torch.float64) / (len(pairs) * 2)
    )


@pytest.mark.parametrize("router", ["softmax_topk", "mpi", "expert_bias"])
def test_pruning_keeps_router_rows_and_experts_in_step(router):
    layer = _layer(router, n_experts=8)
    x = calibration_inputs(400)
    compressed, groups = compress_layer(layer, "frequency", 5, x)
    kept = [g[0] for g in groups]
    assert torch.equal(compressed.router.weight, layer.router.weight[kept])
    assert torch.equal(compressed.experts.w_down, layer.experts.w_down[kept])
    with torch.no_grad():
        y, info = layer(x)
        y_new, info_new = compressed(x)
    only_kept_T = torch.isin(info.topk_idx, torch.tensor(kept)).all(-1)
    assert 20 < int(only_kept_T.sum()) < len(x)
    # A token routed only to kept experts gets the same experts (in new numbering) and the
    # same output: the renormalised top-k weights are unchanged by the smaller softmax
    # (equal up to rounding, hence a tolerance).
    new_index = torch.tensor(kept)[info_new.topk_idx[only_kept_T]]
    assert torch.equal(new_index.sort(-1).values, info.topk_idx[only_kept_T].sort(-1).values)
    torch.testing.assert_close(y_new[only_kept_T], y[only_kept_T], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(y_new[~only_kept_T], y[~only_kept_T], atol=1e-3)


def test_pruning_an_mpi_router_keeps_the_kept_experts_logits():
    layer = make_layer(8, 2, router="mpi", c_prime=2.0)
    x = calibration_inputs()
    compressed, groups = compress_layer(layer, "frequency", 6, x)
    kept = [g[0] for g in groups]
    # C = c'/√E: c' becomes c'·√(6/8) so that C, and every kept logit, stays.
    assert compressed.router.c_prime == pytest.approx(2.0 * math.sqrt(6 / 8))
    assert compressed.router.scale == pytest.approx(layer.router.scale, rel=1e-12)
    with torch.no_grad():
        logits = layer(x)[1].logits
        logits_new = compressed(x)[1].logits
    torch.testing.assert_close(logits_new, logits[:, kept], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("router", ["softmax_topk", "shared_expert", "expert_bias"])
def test_dropping_logits_matches_the_pruned_layer(router):
    # NAEE's Z_K (logits of the dropped experts at −inf) is the R1-sliced layer's output.
    layer = _layer(router)
    x = calibration_inputs()
    calibration = layer_calibration(layer, x)
    keep = [0, 2, 3, 5]
    keep_E = torch.zeros(6, dtype=torch.bool)
    keep_E[keep] = True
    pruned = build_compressed(
        layer, [calibration.view], [prune_plan(calibration.view.weights, keep)]
    )
    with torch.no_grad():
        expected = pruned(x)[0] - (0 if layer.shared_expert is None else layer.shared_expert(x))
        full = layer(x)[0] - (0 if layer.shared_expert is None else layer.shared_expert(x))
    # float64 sums of the float32 expert outputs against the float32 forward.
    torch.testing.assert_close(
        calibration.routed_output(keep_E), expected.double(), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(calibration.routed_output(), full.double(), rtol=1e-5, atol=1e-6)


def test_naee_output_is_summed_in_float64_from_the_expert_outputs():
    """The NAEE loss is float64 as documented: Z_K = Σ_e g_te E_e(x_t) with the expert outputs
    cast to float64 and float64 gates, checked against a per-token numpy sum."""
    layer = make_layer(6, 2, seed=5)
    x = calibration_inputs(40)
    calibration = layer_calibration(layer, x)
    keep_E = torch.tensor([True, False, True, True, False, True])
    z = calibration.routed_output(keep_E)
    assert z.dtype == torch.float64
    logits = calibration.logits_TE.double().numpy()
    outputs = calibration.outputs_ETD.double().numpy()
    expected = np.zeros((40, outputs.shape[-1]))
    for t in range(40):
        kept = np.flatnonzero(keep_E.numpy())
        p = np.exp(logits[t, kept] - logits[t, kept].max())
        p /= p.sum()
        top = np.argsort(-logits[t, kept], kind="stable")[:2]
        w = p[top] / p[top].sum()
        expected[t] = sum(wi * outputs[kept[i], t] for wi, i in zip(w, top, strict=True))
    np.testing.assert_allclose(z.numpy(), expected, rtol=1e-12, atol=1e-13)


def test_capacity_dropped_slots_do_not_count():
    """A router with capacity_factor drops slots per forward: calibration counts only the kept
    slots, and Z / Z_K are the layer's (and the pruned layer's) forward with its drops, batch
    by batch."""
    layer = make_layer(6, 2, seed=6, capacity_factor=0.6)
    x = calibration_inputs(96)
    batch_tokens = [48, 48]
    calibration = layer_calibration(layer, x, batch_tokens)
    keep = [0, 1, 3, 4]
    keep_E = torch.zeros(6, dtype=torch.bool)
    keep_E[keep] = True
    pruned = build_compressed(
        layer, [calibration.view], [prune_plan(calibration.view.weights, keep)]
    )
    counts = torch.zeros(6, dtype=torch.long)
    for chunk, z_full, z_pruned in zip(
        x.split(batch_tokens),
        calibration.routed_output().split(batch_tokens),
        calibration.routed_output(keep_E).split(batch_tokens),
        strict=True,
    ):
        with torch.no_grad():
            y, info = layer(chunk)
            y_pruned = pruned(chunk)[0]
        assert not info.keep.all()  # the capacity does drop slots here
        counts += torch.bincount(info.topk_idx[info.keep], minlength=6)
        torch.testing.assert_close(z_full, y.double(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(z_pruned, y_pruned.double(), rtol=1e-5, atol=1e-6)
    assert torch.equal(calibration.counts, counts)
    torch.testing.assert_close(calibration.frequencies, counts.double() / counts.sum())


def _pruned_error(layer, x, keep, batch_tokens) -> float:
    """Σ_batches ‖Z − Z_K‖_F with Z_K from a really pruned layer's forward (float64 sums)."""
    calibration = layer_calibration(layer, x)
    pruned = build_compressed(
        layer, [calibration.view], [prune_plan(calibration.view.weights, list(keep))]
    )
    with torch.no_grad():
        error = (layer(x)[0] - pruned(x)[0]).double()
    return sum(float(chunk.norm()) for chunk in error.split(batch_tokens))


def test_naee_keeps_the_subset_of_least_error_exhaustively_and_greedily():
    layer = make_layer(6, 2, seed=3)
    x = calibration_inputs(90)
    batch_tokens = [30, 30, 30]
    calibration = layer_calibration(layer, x, batch_tokens)
    assert reconstruction_error(calibration, list(range(6))) == 0.0
    errors = {
        keep: _pruned_error(layer, x, keep, batch_tokens)
        for keep in itertools.combinations(range(6), 3)
    }
    best, second = sorted(errors.values())[:2]
    assert second - best > 1e-3  # a clear winner, so the exact argmin is a fair check
    assert tuple(naee_keep(calibration, 3)) == min(errors, key=errors.get)
    # Greedy (exhaustive_limit=0): drop, each step, the expert whose removal costs least.
    kept = list(range(6))
    while len(kept) > 3:
        kept = min(
            ([e for e in kept if e != d] for d in kept),
            key=lambda keep: _pruned_error(layer, x, keep, batch_tokens),
        )
    assert naee_keep(calibration, 3, exhaustive_limit=0) == kept
