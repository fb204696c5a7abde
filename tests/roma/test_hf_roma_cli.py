"""``moealign roma --hf-model PATH --questions FILE.jsonl``: the RoMA study with its baselines on
a tiny transformers MoE model saved with a tokenizer, and its one-line errors."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

transformers = pytest.importorskip("transformers")  # the model under test is its own

from transformers import AutoModelForCausalLM

from helpers_hf import tiny_model
from moealign.cli import main
from moealign.data.batching import ANSWER_SEPARATOR
from moealign.data.tasks import TaskSuiteConfig, build_task_suite, multiple_choice_view
from moealign.data.tokenizer import ByteTokenizer
from moealign.roma.questions import split_questions
from moealign.roma.study import METHODS

STUDY = [
    "encoder=builtin",
    "seeds=[0]",
    "layers=all",
    "train_examples_per_task=8",
    "eval_examples_per_task=6",
    "epochs=1",
    "batch_size=8",
    "oracle_steps=2",
    "lambda_warmup_steps=1",
    "device=cpu",
]


def questions() -> list:
    """Cloze-form questions (plain prompt, options scored as continuations) of three tasks."""
    suite = build_task_suite(
        TaskSuiteConfig(
            examples_per_task=20, tasks=("addition", "max", "brackets"), heldout_tasks=(),
            heldout_compositions=(),
        )
    )  # fmt: skip
    view = multiple_choice_view(suite.train, n_options=4, seed=0)
    return [replace(q, prompt=e.prompt) for q, e in zip(view, suite.train, strict=True)]


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf") / "model"
    tiny_model("qwen2_moe", vocab_size=258).save_pretrained(directory)
    ByteTokenizer().save_pretrained(directory)
    return directory


def write_questions(path, examples) -> None:
    records = [
        {
            "question": q.prompt,
            "options": list(q.options),
            # the gold option as its letter, or (every other question) as its text
            "answer": q.answer if i % 2 else q.options[ord(q.answer) - ord("A")],
            "task": q.task,
        }
        for i, q in enumerate(examples)
    ]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def option_scores(model, question) -> list[float]:
    """Σ log p(" " + option, EOS | question) by the transformers model itself."""
    tokenizer = ByteTokenizer()
    prompt = tokenizer.encode(question.prompt)
    scores = []
    for option in question.options:
        answer = tokenizer.encode(ANSWER_SEPARATOR + option) + [tokenizer.eos_id]
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            log_probs = model(ids[:, :-1]).logits.log_softmax(-1)[0]
        positions = torch.arange(len(prompt) - 1, ids.shape[1] - 1)
        scores.append(float(log_probs[positions, ids[0, len(prompt) :]].double().sum()))
    return scores


@pytest.mark.slow
def test_roma_runs_every_method_on_a_transformers_model(hf_model, tmp_path, capsys):
    examples = questions()
    write_questions(tmp_path / "questions.jsonl", examples)
    out = tmp_path / "roma"
    weights = (hf_model / "model.safetensors").read_bytes()
    argv = ["roma", "--hf-model", str(hf_model), "--questions", str(tmp_path / "questions.jsonl")]
    argv += ["--heldout-tasks", "brackets", "--out", str(out)]
    for override in STUDY:
        argv += ["--set", override]
    assert main([*argv, "--json"]) == 0
    document, printed = capsys.readouterr()
    assert "| roma |" in printed and "roma: seeds" in printed  # the tables and the progress
    results = json.loads((out / "results.json").read_text())
    assert json.loads(document) == {
        "command": "roma",
        "files": {"results": str(out / "results.json"), "markdown": str(out / "results.md")},
        "result": results,
    }
    assert results["base_run"] == str(hf_model)
    assert results["tasks"] == {"seen": ["addition", "max"], "heldout": ["brackets"]}
    assert results["layers"] == [0, 1]
    assert set(results["methods"]) == set(METHODS)
    assert results["seeds"]["0"]["router_tuning"]["steps"] > 0
    # The base model's answers are the argmax of its own option log-likelihoods.
    _, test, heldout = split_questions(examples, ["brackets"])
    model = AutoModelForCausalLM.from_pretrained(hf_model, dtype=torch.float32).eval()
    for name, pool in (("seen", test), ("heldout", heldout)):
        for task, entry in results["methods"]["base"]["0"][name]["tasks"].items():
            asked = [q for q in pool if q.task == task][:6]
            assert entry["references"] == [q.answer for q in asked]
            expected = []
            for question in asked:
                scores = option_scores(model, question)
                expected.append("ABCD"[max(range(len(scores)), key=scores.__getitem__)])
            assert entry["predictions"] == expected
    summary = results["summary"]["accuracy"]
    for name in ("seen", "heldout"):
        assert summary["oracle"][name]["mean"] >= summary["base"][name]["mean"]
    assert (hf_model / "model.safetensors").read_bytes() == weights  # the model is not written


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--base", "{m}", "--questions", "{q}"], "error: --questions: is given with --hf-model"),
        (["--base", "{m}", "--heldout-tasks", "max"], "error: --heldout-tasks: is given with"),
        (["--hf-model", "{m}"], "error: --questions: is given with --hf-model and only"),
        (["--hf-model", "{m}", "--questions", "{bad}", "--heldout-tasks", "max"], "line 2 lacks"),
        (["--hf-model", "{m}", "--questions", "{q}", "--heldout-tasks", "x"], "unknown: ['x']"),
        (["--hf-model", "{m}", "--questions", "{q}"], "--heldout-tasks: got []"),
        (["--hf-model", "{llama}", "--questions", "{q}", "--heldout-tasks", "max"], "model=Llama"),
    ],
)
def test_roma_hf_bad_input_is_one_error_line(hf_model, tmp_path, capsys, argv, message):
    write_questions(tmp_path / "q.jsonl", questions()[:20])
    (tmp_path / "bad.jsonl").write_text(
        '{"question": "q", "options": ["a", "b"], "answer": "A", "task": "t"}\n'
        '{"question": "q", "options": ["a", "b"], "task": "t"}\n'
    )
    llama = transformers.LlamaConfig(
        vocab_size=258, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(llama).save_pretrained(tmp_path / "llama")
    ByteTokenizer().save_pretrained(tmp_path / "llama")
    paths = {"q": tmp_path / "q.jsonl", "bad": tmp_path / "bad.jsonl", "m": hf_model}
    paths["llama"] = tmp_path / "llama"
    args = [a.format(**{k: str(v) for k, v in paths.items()}) for a in argv]
    capsys.readouterr()
    assert main(["roma", *args, "--out", str(tmp_path / "out"), "--set", "encoder=builtin"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
