"""moealign.integrations.hf on tiny random transformers MoE models of every supported family."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")  # the models under test are its own

from transformers import AutoModelForCausalLM

from helpers_hf import (
    COMMON,
    FAMILIES,
    SOFTMAX_FAMILIES,
    VOCAB,
    batch,
    gate_inputs,
    save_with_tokenizer,
    tiny_model,
)
from moealign.integrations.hf import (
    HFRouted,
    MoealignGate,
    capture_routing,
    expert_matrix,
    moe_blocks,
    routing_diagnostics,
    swap_routers,
)
from moealign.integrations.hf_export import export_pretrained, import_pretrained, to_mixtral
from moealign.nn import precompute_routers
from moealign.nn.transformer import ModelConfig, MoETransformer

# Logits of one fp32 forward computed by two implementations (split vs fused projections, a
# folded temperature, a precomputed R_eff, another RoPE layout) differ by rounding only: up to
# ~10 ulp on logits of ~7 (4.5e-6 measured under AVX-512, AVX2 and baseline kernels), while a
# real mistake moves them by > 1e-3.
SAME_FORWARD = dict(rtol=1e-5, atol=1e-5)

# --- capture --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_equals_the_models_own_router(family):
    model, input_ids = tiny_model(family), batch()
    with torch.no_grad():
        capture = capture_routing(model, input_ids)
        native = model(input_ids, output_router_logits=True)
    inputs = gate_inputs(model, input_ids)
    blocks = moe_blocks(model)
    assert len(capture.layers) == len(blocks) == len(native.router_logits)
    torch.testing.assert_close(capture.logits, native.logits, rtol=0, atol=0)
    for layer, block, x, recorded in zip(
        capture.layers, blocks, inputs, native.router_logits, strict=True
    ):
        with torch.no_grad():
            logits, weights, indices = block.mlp.gate(x)
        batch_shape = input_ids.shape
        assert layer.layer == block.layer
        assert layer.logits.shape == (*batch_shape, logits.shape[-1])
        torch.testing.assert_close(layer.logits.reshape(logits.shape), recorded, rtol=0, atol=0)
        torch.testing.assert_close(layer.topk_idx.reshape(indices.shape), indices, rtol=0, atol=0)
        torch.testing.assert_close(layer.topk_weight.reshape(weights.shape), weights)
        # probs from a float64 recomputation of the router's linear map
        logits64 = x.reshape(-1, x.shape[-1]).double() @ block.mlp.gate.weight.double().T
        if family == "deepseek_v3":
            scores = torch.sigmoid(logits64)
            expected = scores / scores.sum(-1, keepdim=True)
            torch.testing.assert_close(
                layer.scores.reshape(scores.shape).double(), scores, rtol=1e-5, atol=1e-6
            )
        else:
            expected = torch.softmax(logits64, -1)
        torch.testing.assert_close(
            layer.probs.reshape(expected.shape).double(), expected, rtol=1e-5, atol=1e-6
        )


def test_capture_excludes_padding_and_diagnostics_match_hand_computation():
    model = tiny_model("mixtral")
    input_ids = batch(shape=(2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    with torch.no_grad():
        capture = capture_routing(model, {"input_ids": input_ids, "attention_mask": mask})
    rows = routing_diagnostics(model, capture)
    for layer, row, block in zip(capture.layers, rows, moe_blocks(model), strict=True):
        chosen = layer.topk_idx[mask.bool()].numpy().ravel()
        counts = np.bincount(chosen, minlength=4).astype(float)
        assert counts.sum() == 9 * 2  # 9 real tokens, top-2
        assert row["expert_counts"] == counts.astype(int).tolist()
        assert row["max_vio"] == pytest.approx((counts.max() - counts.mean()) / counts.mean())
        np.testing.assert_allclose(row["expert_utilisation"], counts / counts.mean())
        p = layer.probs[mask.bool()].double().numpy()
        entropy = -(p * np.log(p)).sum(-1).mean() / math.log(4)
        assert row["token_entropy"] == pytest.approx(entropy)
        w_gate = expert_matrix(block.mlp.experts, "gate").detach().double().numpy()
        rows_ed = block.mlp.gate.weight.detach().double().numpy()
        lam = [
            np.linalg.norm(w_gate[e] @ rows_ed[e])
            / (np.linalg.norm(rows_ed[e]) * np.linalg.svd(w_gate[e], compute_uv=False)[0])
            for e in range(4)
        ]
        assert row["projection_alignment"] == pytest.approx(np.mean(lam))


def test_unsupported_model_is_refused_with_the_supported_families():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="model_type='llama'.*mixtral.*olmoe.*qwen2_moe.*qwen3"):
        capture_routing(model, batch())
    with pytest.raises(ValueError, match="deepseek_v3"):
        swap_routers(model)


def test_capture_rejects_bad_inputs():
    with pytest.raises(ValueError, match="inputs=list"):
        capture_routing(tiny_model("mixtral"), [[1, 2]])


# --- router swap ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", SOFTMAX_FAMILIES)
def test_swap_to_softmax_topk_keeps_logits(family):
    model, input_ids = tiny_model(family), batch()
    with torch.no_grad():
        before = model(input_ids).logits
        swap_routers(model, kind="softmax_topk")
        after = model(input_ids).logits
    assert all(isinstance(block.mlp.gate, MoealignGate) for block in moe_blocks(model))
    torch.testing.assert_close(after, before, **SAME_FORWARD)


@pytest.mark.parametrize("family", SOFTMAX_FAMILIES)
def test_swap_to_mpi_routes_by_the_power_step_and_precomputes_exactly(family):
    model, input_ids = tiny_model(family), batch()
    original_rows = [block.mlp.gate.weight.detach().double() for block in moe_blocks(model)]
    with torch.no_grad():
        before = model(input_ids).logits
    swap_routers(model, kind="mpi", c_prime=4.0)
    inputs = gate_inputs(model, input_ids)
    with torch.no_grad():
        capture = capture_routing(model, input_ids)
    for block, rows, x, layer in zip(
        moe_blocks(model), original_rows, inputs, capture.layers, strict=True
    ):
        # DESIGN.md §3 in float64: r' = normalize(W_gᵀ W_g r), logits = C⟨x, r'⟩, C = C'/√E
        w_gate = expert_matrix(block.mlp.experts, "gate").detach().double()
        power = torch.einsum("efd,ef->ed", w_gate, torch.einsum("efd,ed->ef", w_gate, rows))
        effective = 4.0 / math.sqrt(rows.shape[0]) * power / power.norm(dim=-1, keepdim=True)
        expected = x.reshape(-1, x.shape[-1]).double() @ effective.T
        torch.testing.assert_close(
            layer.logits.reshape(expected.shape).double(), expected, rtol=1e-5, atol=1e-5
        )
    with torch.no_grad():
        mpi = model(input_ids).logits
        precompute_routers(model)
        precomputed = model(input_ids).logits
    assert (mpi - before).abs().max() > 1e-3  # MPI is a different router
    assert all(block.mlp.gate.router.kind == "softmax_topk" for block in moe_blocks(model))
    torch.testing.assert_close(precomputed, mpi, **SAME_FORWARD)


def test_swap_refuses_deepseek_and_unknown_kinds():
    with pytest.raises(ValueError, match="deepseek_v3.*sigmoid.*Supported families: mixtral"):
        swap_routers(tiny_model("deepseek_v3"), kind="softmax_topk")
    with pytest.raises(ValueError, match="kind='hierarchical'"):
        swap_routers(tiny_model("mixtral"), kind="hierarchical")
    model = swap_routers(tiny_model("mixtral"), kind="mpi")
    with pytest.raises(ValueError, match="already holds a moealign router"):
        swap_routers(model, kind="mpi")


# --- export → AutoModelForCausalLM ------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_export_reloads_with_identical_logits(family, tmp_path):
    model, input_ids = tiny_model(family), batch()
    if family != "deepseek_v3":
        swap_routers(model, kind="mpi")  # exported as the precomputed R_eff
    with torch.no_grad():
        expected = model(input_ids).logits
    export_pretrained(model, tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(reloaded) is type(model)
    assert not any(isinstance(block.mlp.gate, MoealignGate) for block in moe_blocks(reloaded))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, expected, **SAME_FORWARD)
    if family != "deepseek_v3":  # the live model keeps its trainable MPI gates
        assert all(isinstance(block.mlp.gate, MoealignGate) for block in moe_blocks(model))


def moealign_model(router: str = "softmax_topk", tie: bool = True, **overrides) -> MoETransformer:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, n_experts=4,
        top_k=2, expert_d_ff=16, tie_embeddings=tie, router=router, init_std=0.3, **overrides,
    )  # fmt: skip
    return MoETransformer(config).eval()


@pytest.mark.parametrize(("router", "tie"), [("softmax_topk", True), ("mpi", False)])
def test_moealign_model_exports_to_mixtral_and_imports_back(router, tie, tmp_path):
    model, input_ids = moealign_model(router, tie, router_options={"temperature": 0.7}), batch()
    with torch.no_grad():
        expected = model(input_ids).logits
    export_pretrained(model, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(reloaded).__name__ == "MixtralForCausalLM"
    assert reloaded.config.tie_word_embeddings is tie
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, expected, **SAME_FORWARD)
        imported = import_pretrained(tmp_path)
        torch.testing.assert_close(imported(input_ids).logits, expected, **SAME_FORWARD)


def test_rotary_layout_needs_the_row_permutation():
    """Without permuting q/k rows, interleaved-pair RoPE and rotate_half RoPE disagree."""
    model, input_ids = moealign_model(), batch()
    hf = to_mixtral(model)
    with torch.no_grad():
        expected = model(input_ids).logits
        torch.testing.assert_close(hf(input_ids).logits, expected, **SAME_FORWARD)
        for index, block in enumerate(model.blocks):
            q, k, _ = block.attn.qkv.weight.split(32)
            hf.model.layers[index].self_attn.q_proj.weight.copy_(q)
            hf.model.layers[index].self_attn.k_proj.weight.copy_(k)
        assert (hf(input_ids).logits - expected).abs().max() > 1e-3


def test_transformers_mixtral_checkpoint_imports_with_identical_logits(tmp_path):
    model, input_ids = tiny_model("mixtral"), batch()
    model.save_pretrained(tmp_path)
    imported = import_pretrained(tmp_path)
    assert imported.config.n_experts == 4 and not imported.config.tie_embeddings
    with torch.no_grad():
        torch.testing.assert_close(
            imported(input_ids).logits, model(input_ids).logits, **SAME_FORWARD
        )


def test_export_and_import_refuse_what_they_cannot_express():
    with pytest.raises(ValueError, match="shared_d_ff=8"):
        export_pretrained(moealign_model(shared_d_ff=8), "unused")
    with pytest.raises(ValueError, match="router kind='hierarchical'"):
        to_mixtral(moealign_model("hierarchical"))
    with pytest.raises(ValueError, match="model_type='qwen3_moe'.*per-head q/k RMSNorm"):
        import_pretrained(tiny_model("qwen3_moe"))
    gqa = transformers.MixtralConfig(**{**COMMON, "num_key_value_heads": 2})
    with pytest.raises(ValueError, match="num_key_value_heads=2"):
        import_pretrained(AutoModelForCausalLM.from_config(gqa))


# --- RoutedModel view -------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_hf_routed_trains_only_the_gate_weights(family):
    model = tiny_model(family)
    routed = HFRouted(model)
    n_layers = routed.n_moe_layers()
    assert n_layers == len(moe_blocks(model))
    gates = routed.router_parameters(list(range(n_layers)))
    assert [id(p) for p in gates] == [id(b.mlp.gate.weight) for b in moe_blocks(model)]
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in gates:
        parameter.requires_grad_(True)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    input_ids = batch()
    output = routed.forward(input_ids, torch.ones_like(input_ids))
    assert output.logits.shape == (2, 7, VOCAB)
    assert all(probs.shape[:2] == (2, 7) for probs in output.probs)
    torch.testing.assert_close(output.probs[-1].sum(-1), torch.ones(2, 7))
    # An LM loss plus a routing term, as RoMA uses (DESIGN.md §5).
    loss = torch.nn.functional.cross_entropy(
        output.logits[:, :-1].reshape(-1, VOCAB), input_ids[:, 1:].reshape(-1)
    ) + sum((probs[:, -1] ** 2).sum() for probs in output.probs)
    loss.backward()
    torch.optim.SGD(gates, lr=0.5).step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {f"model.layers.{b.layer}.mlp.gate.weight" for b in moe_blocks(model)}
    with pytest.raises(ValueError, match="layers contains 5"):
        routed.router_parameters([5])


# --- moealign analyze ---------------------------------------------------------------------------


def test_cli_analyze_writes_diagnostics_and_plots(tmp_path, capsys):
    import json

    from moealign.cli import main

    model = tiny_model("qwen2_moe")
    save_with_tokenizer(model, tmp_path / "model")
    texts = [" ".join(f"w{(7 * i + j) % 50}" for j in range(5 + 3 * i)) for i in range(4)]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": text}) for text in texts))
    out = tmp_path / "report"
    argv = ["analyze", str(tmp_path / "model"), "--data", str(data), "--out", str(out)]
    assert main([*argv, "--seq-len", "8", "--batch-size", "3", "--json"]) == 0
    document, printed = capsys.readouterr()
    assert "MoE layers" in printed and "analyze: batches" in printed  # human output, progress
    report = json.loads((out / "routing.json").read_text())
    document = json.loads(document)
    assert document["result"] == report and document["command"] == "analyze"
    assert document["files"]["entropy_plot"] == str(out / "entropy_maxvio.png")
    # Independent: each document alone (no padding, no windows) through capture_routing.
    counts = np.zeros((2, 4), dtype=int)
    for text in texts:
        ids = torch.tensor([[int(word[1:]) + 1 for word in text.split()]])
        with torch.no_grad():
            windows = [ids[:, start : start + 8] for start in range(0, ids.shape[1], 8)]
            for window in windows:
                counts += capture_routing(model, window).expert_counts().numpy()
    assert [layer["expert_counts"] for layer in report["layers"]] == counts.tolist()
    assert report["layers"][0]["tokens"] == sum(len(text.split()) for text in texts)
    for name in ("utilisation.png", "entropy_maxvio.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 0 | 4 |" in (out / "routing.md").read_text()


def test_cli_analyze_reports_bad_input(tmp_path, capsys):
    from moealign.cli import main

    save_with_tokenizer(tiny_model("mixtral"), tmp_path / "model")
    data = tmp_path / "data.jsonl"
    data.write_text('{"body": "w1 w2"}\n')
    assert main(["analyze", str(tmp_path / "model"), "--data", str(data)]) == 2
    assert "lacks the field 'text'" in capsys.readouterr().err


def test_cli_analyze_prints_no_third_party_info_or_length_warning(tmp_path):
    """Before: six `INFO matplotlib.category` lines (the bar charts' string labels) and the
    tokenizer's warning about documents longer than its maximum length."""
    import json

    from helpers_cli import run_cli

    save_with_tokenizer(tiny_model("mixtral"), tmp_path / "model")
    config = json.loads((tmp_path / "model/tokenizer_config.json").read_text())
    config["model_max_length"] = 8  # shorter than the document: a whole-document warning
    (tmp_path / "model/tokenizer_config.json").write_text(json.dumps(config))
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": " ".join(f"w{i}" for i in range(30))}) + "\n")
    args = ["analyze", str(tmp_path / "model"), "--data", str(data), "--seq-len", "8"]
    result = run_cli(*args, "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "INFO" not in result.stderr and "sequence length" not in result.stderr
    verbose = run_cli(*args, "--out", str(tmp_path / "out2"), "--verbose", cwd=tmp_path)
    assert "INFO matplotlib.category" in verbose.stderr  # the lines are there to hide
