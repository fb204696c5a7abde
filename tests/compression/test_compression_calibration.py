"""Calibration statistics and request checks, against the layers' own forward passes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers_compression import calibration_inputs, layer_calibration, make_layer
from helpers_hf import batch, tiny_model
from moealign.compression import CompressionError, calibrate, check_request, compress_model
from moealign.nn.transformer import ModelConfig, MoETransformer


def test_statistics_match_the_layer_outputs():
    layer = make_layer(5, 2, seed=4)
    x = calibration_inputs(64)
    calibration = layer_calibration(layer, x)
    with torch.no_grad():
        _, info = layer(x)
        # Each expert alone on every token: route all tokens to expert e with weight 1.
        outputs = torch.stack(
            [layer.experts(x, torch.full((64, 1), e), torch.ones(64, 1)) for e in range(5)]
        )
    torch.testing.assert_close(calibration.outputs_ETD, outputs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(calibration.logits_TE, info.logits)
    torch.testing.assert_close(calibration.soft_scores, info.probs.double().mean(0))
    unit = F.normalize(outputs.double(), dim=-1).numpy()
    similarity = np.mean([unit[:, t] @ unit[:, t].T for t in range(64)], axis=0)
    np.testing.assert_allclose(calibration.output_similarity.numpy(), similarity, atol=1e-6)
    assert torch.equal(calibration.counts, torch.bincount(info.topk_idx.flatten(), minlength=5))


def test_calibration_keeps_only_unmasked_tokens_of_every_layer():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_experts=4, top_k=2)
    model = MoETransformer(config).eval()
    input_ids = torch.randint(0, 64, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    seen = []
    handle = model.blocks[1].ffn.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(input_ids)
    handle.remove()
    calibrations = calibrate(model, [{"input_ids": input_ids, "attention_mask": mask}])
    assert [c.n_tokens for c in calibrations] == [18, 18]
    assert calibrations[1].batch_tokens == [18]
    torch.testing.assert_close(calibrations[1].inputs_TD, seen[0][mask.bool()])


def test_requests_that_cannot_be_done_are_refused():
    layer = make_layer(6, 2)
    for method, keep, rank, message in (
        ("prune", 4, None, "method='prune'"),
        ("naee", 7, None, "keep_experts=7"),
        ("naee", 1, None, "top_k=2 <= keep_experts"),
        ("naee", 4, 2, "rank=2"),
        ("submoe", 4, 0, "rank=0"),
    ):
        with pytest.raises(CompressionError, match=message):
            check_request(layer, method, keep, rank)
    with pytest.raises(CompressionError, match="'hierarchical' cannot be compressed"):
        check_request(make_layer(6, 2, router="hierarchical", n_groups=2), "naee", 4)
    with pytest.raises(CompressionError, match="deepseek_v3"):
        compress_model(tiny_model("deepseek_v3"), "naee", 4, [{"input_ids": batch()}])
