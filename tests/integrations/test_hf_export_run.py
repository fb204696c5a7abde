"""``moealign export RUN_DIR OUT``: a run directory becomes a Hugging Face model directory that
transformers' own clients (AutoModelForCausalLM, AutoTokenizer, generate, the text-generation
pipeline) use like any hub model, answering and stopping as moealign's greedy decoding does."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch

pytest.importorskip("transformers")  # its loaders, generate and pipeline are under test

from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
from transformers.utils import logging as transformers_logging

from moealign.cli import main
from moealign.config import load_config
from moealign.data import ByteTokenizer, encode_example
from moealign.data.build import build_data_suite
from moealign.evaluation.generation import greedy_generate
from moealign.evaluation.run import load_run_model
from moealign.nn.transformer import MoETransformer
from moealign.training.checkpoint import load_checkpoint

BUDGET = 20  # new tokens; the longest answer (8 copied letters, spaces, EOS) takes 17

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "hf"
    assert main(["export", str(trained_run), str(out)]) == 0
    return out


def test_export_writes_a_complete_model_directory(exported):
    names = {path.name for path in exported.iterdir()}
    assert names == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    config = json.loads((exported / "config.json").read_text())
    generation = json.loads((exported / "generation_config.json").read_text())
    tokenizer = ByteTokenizer()
    ids = {"bos_token_id": tokenizer.eos_id, "eos_token_id": tokenizer.eos_id}
    ids["pad_token_id"] = tokenizer.pad_id
    assert {key: config[key] for key in ids} == ids
    assert {key: generation[key] for key in ids} == ids
    assert generation.get("do_sample", False) is False and generation["max_new_tokens"] == 64
    assert "max_length" not in generation  # see test_generate_and_pipeline_run_without_warnings


def test_generate_and_pipeline_run_without_warnings(exported):
    """A call's own budget meets no ``max_length`` of the export: no Python warning (an error
    here) and no warning through transformers' logger (captured at its library root)."""
    hf_model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(exported)
    generator = pipeline("text-generation", model=hf_model, tokenizer=hf_tokenizer)
    inputs = hf_tokenizer("copy: a b c =", return_tensors="pt")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    library_root = transformers_logging.get_logger()
    library_root.addHandler(handler)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("error")
            output = hf_model.generate(**inputs, max_new_tokens=16)
            answer = generator("copy: a b c =", max_new_tokens=16, return_full_text=False)
    finally:
        library_root.removeHandler(handler)
    assert [record.getMessage() for record in records] == []
    assert output.shape[1] <= inputs["input_ids"].shape[1] + 16 and answer[0]["generated_text"]


def test_generate_and_pipeline_answer_and_stop_like_moealign(trained_run, exported):
    config, model = load_run_model(trained_run, "cpu")
    tokenizer = ByteTokenizer()
    examples = build_data_suite(config.data).test
    prompts = [encode_example(example, tokenizer)[0] for example in examples]
    expected = greedy_generate(model, prompts, BUDGET, tokenizer.eos_id)
    stopped = [ids for ids in expected if ids[-1] == tokenizer.eos_id]
    assert 0 < len(stopped), "the trained model should end some answers with EOS"

    hf_model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(exported)
    generator = pipeline("text-generation", model=hf_model, tokenizer=hf_tokenizer)
    texts = [example.prompt for example in examples]
    answers = generator(texts, max_new_tokens=BUDGET, return_full_text=False)
    for text, prompt_ids, ids, answer in zip(texts, prompts, expected, answers, strict=True):
        inputs = hf_tokenizer(text, return_tensors="pt")
        assert inputs["input_ids"][0].tolist() == prompt_ids
        with torch.no_grad():
            output = hf_model.generate(**inputs, max_new_tokens=BUDGET)
        # Exact tokens: both argmax the same logits (within 1e-5, far from any tie here).
        assert output[0, len(prompt_ids) :].tolist() == ids
        assert answer[0]["generated_text"] == tokenizer.decode(ids)
    # Without a budget of its own generate() runs to EOS or for the export's max_new_tokens
    # (64 = model.max_seq_len); moealign's decoding also stops at the model's 64 positions.
    long = greedy_generate(model, prompts[:3], 64, tokenizer.eos_id)
    for text, ids in zip(texts[:3], long, strict=True):
        inputs = hf_tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            output = hf_model.generate(**inputs)
        new_ids = output[0, inputs["input_ids"].shape[1] :].tolist()
        assert new_ids == ids if ids[-1] == tokenizer.eos_id else new_ids[: len(ids)] == ids


def test_export_of_an_earlier_step_and_bad_requests(trained_run, tmp_path, capsys):
    out = tmp_path / "step20"
    assert main(["export", str(trained_run), str(out), "--step", "20"]) == 0
    config, _ = load_run_model(trained_run, "cpu")
    model = MoETransformer(config.model).eval()
    load_checkpoint(trained_run / "checkpoints" / "step_000020").load_model(model)
    input_ids = torch.tensor([ByteTokenizer().encode("add: 12 + 7 = 19 copy: a b =")])
    hf_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            hf_model(input_ids).logits, model(input_ids).logits, rtol=0, atol=1e-5
        )
    capsys.readouterr()
    assert main(["export", str(trained_run), str(tmp_path / "x"), "--step", "7"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --step 7:") and "steps [20, 40]" in err
    assert main(["export", str(trained_run), str(out)]) == 2  # OUT holds the step-20 export
    assert "is not an empty directory" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "y")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_export_refuses_a_model_mixtral_cannot_express(tmp_path, capsys):
    config = load_config(None, ["model.ffn=dense"])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(config.to_dict()))
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (
        "error: this MoETransformer cannot be exported as Mixtral: ffn='dense' (needs 'moe')\n"
    )
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_merged_model_and_says_why(tmp_path, capsys):
    """An R2-merged model (E router rows sharing E′ experts) has no Mixtral form."""
    config = load_config(None, ["model.n_experts=8", "model.merged_experts=4"])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(config.to_dict()))
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (
        "error: this MoETransformer cannot be exported as Mixtral: merged_experts=4 (a merged "
        "model keeps 8 router rows that share its experts, R2; Mixtral needs one router row "
        "per expert)\n"
    )
    assert not (tmp_path / "out").exists()
