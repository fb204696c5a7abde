"""lm-evaluation-harness (a real outside client, its ``hf`` backend) on a model exported by
``moealign export``: its per-choice and rolling log-likelihoods on a local task equal
moealign's native ones (:func:`option_log_likelihoods`, :func:`evaluate_lm`) to 1e-5."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")  # the client under test (the "eval" extra)

from lm_eval.tasks import TaskManager

from moealign.cli import main
from moealign.data import ByteTokenizer, multiple_choice_view
from moealign.data.batching import ANSWER_SEPARATOR
from moealign.data.build import build_data_suite
from moealign.evaluation.lm import evaluate_lm
from moealign.evaluation.multiple_choice import option_log_likelihoods
from moealign.evaluation.run import load_run_model

pytestmark = pytest.mark.slow

# The recipe of docs/huggingface.md: one multiple-choice and one rolling log-likelihood task on
# local JSONL.
TASKS_YAML = """\
task: moealign_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {questions}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: options
doc_to_target: gold
metric_list:
  - metric: acc
---
task: moealign_text
dataset_path: json
dataset_kwargs:
  data_files:
    test: {texts}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
"""


def assert_agree(harness, native, lengths) -> None:
    """|lm-eval − moealign| <= 1e-5 + (n − 1)·2⁻²⁴·|value| per sample of n tokens.

    The models agree to < 1e-6 (fp32 logits of two implementations: grouped vs eager experts,
    moealign's vs transformers' attention, summed in float64); the second term is the error
    bound of lm-eval's own float32 sum of the n token log-probabilities (all of one sign), up
    to 1.4e-5 for a sum near -100 (AVX2, one thread), which no choice of kernels removes."""
    harness_N = torch.tensor(harness, dtype=torch.float64).flatten()
    native_N = torch.tensor(native, dtype=torch.float64).flatten()
    n_N = torch.tensor(lengths, dtype=torch.float64).flatten()
    bound_N = 1e-5 + (n_N - 1) * 2.0**-24 * native_N.abs()
    difference_N = (harness_N - native_N).abs()
    assert bool((difference_N <= bound_N).all()), (difference_N, bound_N)


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def test_lm_eval_log_likelihoods_match_moealign(trained_run, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    exported = tmp_path / "hf"
    assert main(["export", str(trained_run), str(exported)]) == 0
    config, model = load_run_model(trained_run, "cpu")
    tokenizer = ByteTokenizer()
    examples = build_data_suite(config.data).test
    # Cloze form: the plain prompt, the options scored as its continuations.
    questions = [
        replace(question, prompt=example.prompt)
        for question, example in zip(
            multiple_choice_view(examples, n_options=4, seed=0), examples, strict=True
        )
    ]
    questions = [q for q in questions if q.task == "copy"][:4] + [
        q for q in questions if q.task == "addition"
    ][:4]
    texts = [example.prompt + ANSWER_SEPARATOR + example.answer for example in examples[:6]]
    write_jsonl(
        tmp_path / "questions.jsonl",
        [
            {"prompt": q.prompt, "options": list(q.options), "gold": ord(q.answer) - ord("A")}
            for q in questions
        ],
    )
    write_jsonl(tmp_path / "texts.jsonl", [{"text": text} for text in texts])
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for index, task in enumerate(TASKS_YAML.split("---\n")):
        text = task.format(questions=tmp_path / "questions.jsonl", texts=tmp_path / "texts.jsonl")
        (tasks / f"task{index}.yaml").write_text(text)

    results = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(exported), "dtype": "float32"},
        tasks=["moealign_choice", "moealign_text"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        device="cpu",
        batch_size=4,
        log_samples=True,
    )
    samples = {
        task: sorted(entries, key=lambda s: s["doc_id"])
        for task, entries in results["samples"].items()
    }

    # Multiple choice: Σ log p(" " + option | prompt) per option (no EOS: lm-eval's scoring).
    native = option_log_likelihoods(model, tokenizer, questions, "text", with_eos=False)
    harness = [[loglik for loglik, _ in s["filtered_resps"]] for s in samples["moealign_choice"]]
    lengths = [[len(tokenizer.encode(ANSWER_SEPARATOR + o)) for o in q.options] for q in questions]
    assert_agree(harness, native, lengths)
    accuracy = sum(
        max(range(len(scores)), key=scores.__getitem__) == ord(q.answer) - ord("A")
        for scores, q in zip(native, questions, strict=True)
    ) / len(questions)
    assert results["results"]["moealign_choice"]["acc,none"] == pytest.approx(accuracy)

    # Rolling: Σ_t log p(x_t | EOS, x_<t), the EOS prefix (BOS = EOS) as lm-eval's first token.
    native_rolling = []
    for text in texts:
        ids = tokenizer.encode(text)
        batch = {
            "input_ids": torch.tensor([[tokenizer.eos_id, *ids[:-1]]]),
            "labels": torch.tensor([ids]),
        }
        lm = evaluate_lm(model, [batch])
        native_rolling.append(-lm.loss * lm.tokens)
    harness_rolling = [s["filtered_resps"][0] for s in samples["moealign_text"]]
    assert_agree(harness_rolling, native_rolling, [len(tokenizer.encode(t)) for t in texts])
    words = sum(len(text.split()) for text in texts)
    word_perplexity = math.exp(-sum(native_rolling) / words)
    assert results["results"]["moealign_text"]["word_perplexity,none"] == pytest.approx(
        word_perplexity, rel=1e-5
    )
