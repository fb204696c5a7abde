"""Task accuracy on the synthetic suite (DESIGN.md §7): greedy answers scored by exact match,
with BLEU and ROUGE-L for generation tasks, per task and per evaluation set.

Prompts are encoded exactly as in training (:func:`moealign.data.batching.encode_example`): the
model sees the prompt ids and must continue with ``ANSWER_SEPARATOR + answer`` and EOS.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from torch import nn

from moealign.data.batching import ANSWER_SEPARATOR, encode_example
from moealign.data.tasks import TASK_FAMILIES, TaskExample, TaskSuite
from moealign.data.tokenizer import Tokenizer
from moealign.evaluation.common import check_positive_int
from moealign.evaluation.generation import greedy_generate
from moealign.evaluation.metrics import bleu, exact_match, rouge_l
from moealign.progress import phase

HELDOUT_SETS = ("heldout_tasks", "heldout_compositions")


@dataclass
class TaskResult:
    """One task's scores. ``correct[i]`` is 1 when example i is right, else 0 (the per-example
    array the CTGI bootstrap resamples); ``bleu`` (0–100) and ``rouge_l`` (0–1) only for
    generation-kind tasks."""

    task: str
    kind: str
    accuracy: float
    correct: list[int]
    predictions: list[str]
    references: list[str]
    bleu: float | None = None
    rouge_l: float | None = None

    def to_dict(self) -> dict:
        result = {
            "kind": self.kind,
            "examples": len(self.correct),
            "accuracy": self.accuracy,
            "correct": self.correct,
            "predictions": self.predictions,
            "references": self.references,
        }
        if self.bleu is not None:
            result |= {"bleu": self.bleu, "rouge_l": self.rouge_l}
        return result


@dataclass
class TaskEvaluation:
    """Per-task results of one evaluation set, in the order tasks first appear."""

    tasks: dict[str, TaskResult]

    @property
    def macro_accuracy(self) -> float:
        """Mean over tasks of the task accuracy (each task counts once)."""
        return float(np.mean([result.accuracy for result in self.tasks.values()]))

    def correct_by_task(self) -> dict[str, list[int]]:
        """Per-example correctness per task, the input :func:`moealign.evaluation.ctgi.ctgi`
        expects."""
        return {task: result.correct for task, result in self.tasks.items()}

    def to_dict(self) -> dict:
        return {
            "accuracy": self.macro_accuracy,
            "tasks": {task: result.to_dict() for task, result in self.tasks.items()},
        }


def group_by_task(examples: Sequence[TaskExample]) -> dict[str, list[TaskExample]]:
    if not examples:
        raise ValueError("examples is empty; give at least one TaskExample")
    groups: dict[str, list[TaskExample]] = {}
    for example in examples:
        groups.setdefault(example.task, []).append(example)
    return groups


def task_kind(task: str) -> str:
    if task not in TASK_FAMILIES:
        raise ValueError(f"task={task!r} is not a known task; known tasks: {sorted(TASK_FAMILIES)}")
    return TASK_FAMILIES[task].kind


def score_answers(
    task: str,
    kind: str,
    predictions: list[str],
    references: list[str],
    complete: Sequence[bool] | None = None,
) -> TaskResult:
    """Exact match after whitespace normalisation per example (an incomplete prediction, when
    ``complete`` is given, is wrong); BLEU and ROUGE-L on the same strings for generation tasks
    (:mod:`moealign.evaluation.metrics`)."""
    complete = [True] * len(predictions) if complete is None else complete
    correct = [
        int(done and exact_match([p], [r]) == 1.0)
        for p, r, done in zip(predictions, references, complete, strict=True)
    ]
    result = TaskResult(task, kind, float(np.mean(correct)), correct, predictions, references)
    if kind == "generation":
        result.bleu = bleu(predictions, references)
        result.rouge_l = rouge_l(predictions, references)
    return result


def evaluate_tasks(
    model: nn.Module,
    tokenizer: Tokenizer,
    examples: Sequence[TaskExample],
    max_new_tokens: int | None = None,
    batch_size: int = 32,
) -> TaskEvaluation:
    """Greedy-decode each example's answer and score it per task (DESIGN.md §7).

    The prompt ids are those of training (:func:`encode_example`); the prediction is the decoded
    generation (up to EOS) with the leading ``ANSWER_SEPARATOR`` removed. An example is correct
    when the model emitted EOS within the token budget and the prediction equals the answer
    after whitespace normalisation (so a generation cut off by the budget never counts, even
    where the cut happens to match); accuracy is the mean. Generation-kind tasks also get
    corpus BLEU (sacrebleu) and mean ROUGE-L F1 (rouge-score) of the predictions. The budget is
    ``max_new_tokens``, by default per task the longest encoded answer (with EOS) of that task.
    """
    if max_new_tokens is not None:
        check_positive_int("max_new_tokens", max_new_tokens)
    groups = group_by_task(examples)
    # One generation call for every task (longer batches), each task with its own budget.
    prompts, budgets = [], []
    for task_examples in groups.values():
        encoded = [encode_example(example, tokenizer) for example in task_examples]
        budget = max_new_tokens or max(len(answer_ids) for _, answer_ids in encoded)
        prompts += [prompt for prompt, _ in encoded]
        budgets += [budget] * len(encoded)
    generated = iter(greedy_generate(model, prompts, budgets, tokenizer.eos_id, batch_size))
    results = {}
    for task, task_examples in groups.items():
        task_generated = [next(generated) for _ in task_examples]
        complete = [bool(ids) and ids[-1] == tokenizer.eos_id for ids in task_generated]
        predictions = [
            tokenizer.decode(ids[:-1] if done else ids).removeprefix(ANSWER_SEPARATOR)
            for ids, done in zip(task_generated, complete, strict=True)
        ]
        references = [example.answer for example in task_examples]
        results[task] = score_answers(task, task_kind(task), predictions, references, complete)
    return TaskEvaluation(results)


def evaluate_suite(
    model: nn.Module,
    tokenizer: Tokenizer,
    suite: TaskSuite,
    max_new_tokens: int | None = None,
    batch_size: int = 32,
    max_examples_per_task: int | None = None,
    sets: Sequence[str] | None = None,
) -> dict:
    """:func:`evaluate_tasks` on every non-empty set of ``suite.evaluation_sets()`` (seen-task
    test, held-out tasks, held-out compositions, long lengths; ``sets`` names a subset, which
    must include ``test``), on at most ``max_examples_per_task`` examples of each task per set
    (the first ones; None = all).

    Returns ``{"sets": {set: TaskEvaluation.to_dict()}, "seen_mean", "heldout_mean"}``:
    ``seen_mean`` is the macro accuracy on the seen-task test split, ``heldout_mean`` the mean
    task accuracy over the held-out tasks and held-out compositions together (None when the
    suite holds none out).
    """
    chosen = {
        name: first_per_task(examples, max_examples_per_task)
        for name, examples in suite.evaluation_sets().items()
        if examples and (sets is None or name in sets)
    }
    evaluations = {}
    with phase("evaluate: task answers", sum(map(len, chosen.values()))) as done:
        for name, examples in chosen.items():
            evaluations[name] = evaluate_tasks(
                model, tokenizer, examples, max_new_tokens, batch_size
            )
            done.update(len(examples))
    heldout_accuracies = [
        result.accuracy
        for name in HELDOUT_SETS
        if name in evaluations
        for result in evaluations[name].tasks.values()
    ]
    return {
        "sets": {name: evaluation.to_dict() for name, evaluation in evaluations.items()},
        "seen_mean": evaluations["test"].macro_accuracy,
        "heldout_mean": float(np.mean(heldout_accuracies)) if heldout_accuracies else None,
    }


def per_task_accuracy(suite_result: Mapping) -> dict[str, dict[str, float]]:
    """``{"seen": {task: accuracy}, "heldout": {task: accuracy}}`` from an
    :func:`evaluate_suite` result: the seen-task test split, and the held-out tasks and
    compositions (what reports and CTGI compare)."""
    sets = suite_result["sets"]
    seen = {task: r["accuracy"] for task, r in sets.get("test", {"tasks": {}})["tasks"].items()}
    heldout = {
        task: r["accuracy"]
        for name in HELDOUT_SETS
        if name in sets
        for task, r in sets[name]["tasks"].items()
    }
    return {"seen": seen, "heldout": heldout}


def suite_record(
    model: nn.Module,
    tokenizer: Tokenizer,
    suite: TaskSuite,
    max_examples_per_task: int,
    sets: Sequence[str] | None = None,
) -> dict:
    """The task part of a run's final evaluation (``final_eval.json`` and ``eval.json``):
    ``tasks`` (:func:`evaluate_suite`), ``task_accuracy`` (:func:`per_task_accuracy`),
    ``task_accuracy_seen`` and, when the suite holds held-out sets, ``task_accuracy_heldout``
    (only the evaluation sets ``sets``, default all)."""
    tasks = evaluate_suite(
        model, tokenizer, suite, max_examples_per_task=max_examples_per_task, sets=sets
    )
    record = {
        "tasks": tasks,
        "task_accuracy": per_task_accuracy(tasks),
        "task_accuracy_seen": tasks["seen_mean"],
    }
    if tasks["heldout_mean"] is not None:
        record["task_accuracy_heldout"] = tasks["heldout_mean"]
    return record


def first_per_task(examples: Sequence[TaskExample], limit: int | None) -> list[TaskExample]:
    if limit is None:
        return list(examples)
    return [ex for group in group_by_task(examples).values() for ex in group[:limit]]
