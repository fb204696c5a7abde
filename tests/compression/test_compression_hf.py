"""Compression of tiny Hugging Face MoE models (every softmax family): the result saves with
save_pretrained and reloads with plain transformers; routing stays consistent."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers_hf import SOFTMAX_FAMILIES, batch, save_with_tokenizer, tiny_model
from moealign.cli import main
from moealign.compression import METHODS, compress_model
from moealign.compression.data import text_batches
from moealign.integrations.hf import moe_blocks


def _calibration(n_batches: int = 3):
    return [{"input_ids": batch(seed, (2, 16))} for seed in range(10, 10 + n_batches)]


def _logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


@pytest.mark.parametrize("family", SOFTMAX_FAMILIES)
def test_keeping_every_expert_is_the_identity(family):
    model = tiny_model(family)
    compressed = compress_model(model, "naee", 4, _calibration()).model
    assert torch.equal(_logits(compressed, batch()), _logits(model, batch()))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", SOFTMAX_FAMILIES)
def test_compressed_model_saves_and_reloads_with_transformers(family, method, tmp_path):
    model = tiny_model(family)
    result = compress_model(model, method, 3, _calibration())
    result.model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_experts == 3
    config = json.loads((tmp_path / "config.json").read_text())
    assert config.get("num_local_experts", config.get("num_experts")) == 3
    for block in moe_blocks(reloaded):
        assert block.mlp.gate.weight.shape[0] == 3
        assert block.mlp.experts.gate_up_proj.shape[0] == 3
    torch.testing.assert_close(_logits(reloaded, batch()), _logits(result.model, batch()))
    assert not torch.allclose(_logits(reloaded, batch()), _logits(model, batch()))
    # Shared experts, attention and embeddings are copied unchanged.
    before, after = model.state_dict(), reloaded.state_dict()
    untouched = [k for k in before if ".mlp.gate." not in k and ".mlp.experts." not in k]
    assert all(torch.equal(before[k], after[k]) for k in untouched)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe"])
def test_pruned_router_rows_and_experts_stay_in_step(family):
    model = tiny_model(family)
    result = compress_model(model, "frequency", 3, _calibration())
    kept = [group[0] for group in result.groups[0]]
    mlp, pruned = moe_blocks(model)[0].mlp, moe_blocks(result.model)[0].mlp
    x = torch.randn(1, 200, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, _, index = mlp.gate(x.reshape(-1, 32))
        y, y_new = mlp(x)[0], pruned(x)[0]
    only_kept = torch.isin(index, torch.tensor(kept)).all(-1)
    assert 10 < int(only_kept.sum()) < 200
    if family == "olmoe":  # norm_topk_prob=False: weights p_e / Σ_{kept} p_j after slicing
        kept_mass = torch.softmax(logits.float(), -1)[:, kept].sum(-1, keepdim=True)
        expected = y[only_kept] / kept_mass[only_kept]
    else:  # renormalised top-k weights: unchanged
        expected = y[only_kept]
    torch.testing.assert_close(y_new[only_kept], expected, rtol=1e-5, atol=1e-6)


def test_cli_compresses_a_hugging_face_directory(tmp_path, capsys):
    model = tiny_model("qwen2_moe")
    save_with_tokenizer(model, tmp_path / "model")
    texts = [" ".join(f"w{(7 * i + 3 * j) % 50}" for j in range(40)) for i in range(20)]
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"text": text}) for text in texts))
    argv = ["compress", str(tmp_path / "model"), "--method", "submoe", "--keep-experts", "2"]
    out = tmp_path / "compressed"
    assert main([*argv, "--calib", str(calib), "--calib-tokens", "300", "--out", str(out)]) == 0
    assert "val perplexity" in capsys.readouterr().out
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.num_experts == 2
    assert reloaded.config.moealign_compression["method"] == "submoe"
    tokenizer = AutoTokenizer.from_pretrained(out)
    # The same compression through the API on the file's first 300 tokens.
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    batches, held_out = text_batches(calib, encode, 64, 8, 300, 300)
    assert sum(int(b["attention_mask"].sum()) for b in batches) == 300
    expected = compress_model(model, "submoe", 2, batches).model
    torch.testing.assert_close(_logits(reloaded, batch()), _logits(expected, batch()))
    report = json.loads((out / "compression.json").read_text())
    assert report["original"]["val_loss"] is not None
    assert report["retention"]["params_total"] < 1
    # A transformers config has one router row per expert: merging uses R3 there, and says so.
    assert report["compression"]["router_update"] == "R3 collapse"
    assert "needs one router row per expert" in report["compression"]["router_update_note"]
