"""torchtitan Qwen3 MoE → Hugging Face Qwen3-MoE (``export_hf``): transformers loads the folder
and computes torchtitan's logits and routing; ``moealign analyze`` and ``compress`` read it;
what HF cannot express is refused. The torchtitan side runs with fp32 experts (helpers_torchtitan's
``Float32GroupedExperts``: torchtitan's stock experts round to bf16), so logits are compared
at fp32 tolerance and the top-K expert ids exactly."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

pytest.importorskip("torchtitan")

from helpers_cli import run_cli  # noqa: E402
from helpers_torchtitan import load_example, with_fp32_experts  # noqa: E402
from moealign.engines.torchtitan import (  # noqa: E402
    MPIGate,
    RoutingRecorder,
    export_hf,
    load_checkpoint,
)

example = load_example()


def fp32_model(mpi_options: dict | None = {"c_prime": 4.0}, tie: bool = False, **router):  # noqa: B006
    """The example's tiny torchtitan Qwen3 MoE with fp32 experts (and ``router`` options;
    ``tie``: the embedding and output weights tied)."""
    config = dataclasses.replace(example.tiny_qwen3_moe(mpi_options), enable_weight_tying=tie)
    for layer in config.layers:
        moe = with_fp32_experts(layer.moe)
        layer.moe = dataclasses.replace(moe, router=dataclasses.replace(moe.router, **router))
    torch.manual_seed(0)
    model = config.build()
    model.init_states()
    return model


def hf_routing(hf_model, input_ids) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """HF's logits and every MoE layer's top-K expert ids (hooks on its ``mlp.gate``)."""
    ids = []
    handles = [
        layer.mlp.gate.register_forward_hook(lambda m, args, out: ids.append(out[2]))
        for layer in hf_model.model.layers
    ]
    with torch.no_grad():
        logits = hf_model(input_ids).logits
    for handle in handles:
        handle.remove()
    return logits, ids


def torchtitan_routing(model, input_ids) -> tuple[torch.Tensor, list[torch.Tensor]]:
    with RoutingRecorder(model) as recorder, torch.no_grad():
        logits = model(input_ids)
        return logits, [info.topk_idx for info in recorder.routing]


def test_exported_mpi_model_loads_in_transformers_with_torchtitans_logits_and_routing(tmp_path):
    from transformers import AutoModelForCausalLM

    model = fp32_model()
    export_hf(model, tmp_path / "hf")
    hf_model, info = AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values())  # no missing, unexpected or mismatched weight
    assert type(hf_model).__name__ == "Qwen3MoeForCausalLM"
    for index, layer in enumerate(hf_model.model.layers):  # the gate holds R_eff, not R
        gate = model.layers[str(index)].moe.router.gate
        assert isinstance(gate, MPIGate)  # the model itself is not changed
        torch.testing.assert_close(layer.mlp.gate.weight, gate.effective_weight())
        assert not torch.allclose(layer.mlp.gate.weight, gate.weight)
    input_ids, _, _ = example.task_batch(0)
    expected, expected_ids = torchtitan_routing(model, input_ids)
    logits, ids = hf_routing(hf_model, input_ids)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert len(ids) == len(expected_ids) == example.LAYERS
    for got, want in zip(ids, expected_ids, strict=True):  # as sets: torchtitan's are unsorted
        assert torch.equal(got.sort(-1).values, want.sort(-1).values)


def test_tied_embeddings_export_as_hfs_tied_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    model = fp32_model(None, tie=True)  # torchtitan's own softmax router
    export_hf(model, tmp_path / "hf")
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert hf_model.config.tie_word_embeddings
    assert hf_model.lm_head.weight.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr()
    input_ids, _, _ = example.task_batch(1)
    expected, expected_ids = torchtitan_routing(model, input_ids)
    logits, ids = hf_routing(hf_model, input_ids)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(ids, expected_ids, strict=True):
        assert torch.equal(got.sort(-1).values, want.sort(-1).values)


@pytest.mark.slow
def test_dcp_checkpoint_exports_for_moealign_analyze_and_compress(tmp_path):
    example.train(tmp_path / "run", 3, checkpoint_every=3)
    checkpoint = tmp_path / "run" / "checkpoint" / "step-3"
    hf_dir = example.export(tmp_path / "run", tmp_path / "hf")
    result = run_cli(
        "analyze",
        str(hf_dir),
        "--data",
        str(hf_dir / "tasks.jsonl"),
        "--tokenizer",
        str(hf_dir),
        "--out",
        str(tmp_path / "analysis"),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    layers = json.loads((tmp_path / "analysis" / "routing.json").read_text())["layers"]
    # analyze's expert counts are the trained torchtitan model's own routing of the same tokens
    model = load_checkpoint(fp32_model(), checkpoint)
    _, expected_ids = torchtitan_routing(model, example.task_batch(0)[0])
    assert len(layers) == example.LAYERS
    for row, ids in zip(layers, expected_ids, strict=True):
        counts = torch.bincount(ids.flatten(), minlength=example.EXPERTS)
        assert row["expert_counts"] == counts.tolist()
        assert row["tokens"] == ids.shape[0]
    # and moealign compress prunes it (frequency: the 4 most used experts of every layer)
    result = run_cli(
        "compress",
        str(hf_dir),
        "--method",
        "frequency",
        "--keep-experts",
        "4",
        "--calib",
        str(hf_dir / "tasks.jsonl"),
        "--calib-tokens",
        "128",
        "--out",
        str(tmp_path / "pruned"),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tmp_path / "pruned").num_experts == 4


@pytest.mark.parametrize(
    "router, option",
    [
        ({"score_func": "sigmoid"}, "score_func"),
        ({"route_scale": 2.5}, "route_scale"),
        (
            {"route_norm": True, "num_expert_groups": 2, "num_limited_groups": 1},
            "num_expert_groups",
        ),
    ],
)
def test_routing_hf_cannot_express_is_refused_by_name(router, option, tmp_path):
    with pytest.raises(ValueError, match=rf"layers\.0\.moe\.{option}="):
        export_hf(fp32_model(None, **router), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()  # nothing written


def test_non_zero_expert_bias_is_refused(tmp_path):
    config = example.tiny_qwen3_moe(None)
    for layer in config.layers:
        layer.moe = dataclasses.replace(layer.moe, load_balance_coeff=1e-3)
    model = config.build()
    model.init_states()
    export_hf(model, tmp_path / "zero")  # a zero bias changes no routing
    model.layers["1"].moe.expert_bias_E[3] = 0.1
    with pytest.raises(ValueError, match=r"layers\.1\.moe\.expert_bias_E"):
        export_hf(model, tmp_path / "hf")
