"""Model-level evaluation (DESIGN.md §7): perplexity with routing statistics, greedy task
accuracy with BLEU/ROUGE, multiple-choice log-likelihood scoring, projection alignment.

Every function takes a model whose call ``model(input_ids_BS)`` returns an object with
``.logits`` (B, S, V) (and, for :func:`evaluate_lm`, ``.routing``: one
:class:`~moealign.nn.moe.RoutingInfo` per MoE layer), runs on the device of the model's
parameters, under ``torch.no_grad`` in eval mode, and restores the model's training mode
afterwards. Results are plain floats, ints, strings, lists and dicts (JSON-serialisable).

Prompts are encoded exactly as in training (:func:`moealign.data.batching.encode_example`): the
model sees the prompt ids and must continue with ``ANSWER_SEPARATOR + answer`` and EOS.

Batching relies on causal attention: a row's logits at position s depend only on its tokens
0..s, so rows of different lengths share a right-padded batch. The one exception is a router
with a capacity factor, whose token dropping is decided over the whole batch; there results
depend on the batch composition (as they do in training).

The cross-task generalisation index lives in :mod:`moealign.ctgi`; ``ctgi``, ``CTGIResult``
and ``transfer_ratio`` are re-exported here as ``moealign.evaluate.ctgi`` etc. (the path
DESIGN.md §1 names).

Shape letters: B rows, S positions, V vocabulary, L MoE layers, E experts, T tokens.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moealign import diagnostics
from moealign.ctgi import CTGIResult as CTGIResult  # re-exported (DESIGN.md §1)
from moealign.ctgi import ctgi as ctgi
from moealign.ctgi import transfer_ratio as transfer_ratio
from moealign.data.batching import ANSWER_SEPARATOR, IGNORE_INDEX, encode_example
from moealign.data.tasks import OPTION_LETTERS, TASK_FAMILIES, TaskExample, TaskSuite
from moealign.data.tokenizer import Tokenizer
from moealign.metrics import ExpertLoadAccumulator, bleu, exact_match, perplexity, rouge_l
from moealign.nn.moe import MoELayer, RoutingInfo
from moealign.nn.routers import MPIRouter

HELDOUT_SETS = ("heldout_tasks", "heldout_compositions")
MULTIPLE_CHOICE_CONTINUATIONS = ("text", "letter")


def _model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model with neither."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _max_sequence_length(model: nn.Module) -> int | None:
    """``model.config.max_seq_len`` where the model has one (:class:`MoETransformer`)."""
    return getattr(getattr(model, "config", None), "max_seq_len", None)


@contextlib.contextmanager
def _evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the duration; the previous training mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _check_positive_int(name: str, value: object) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ValueError(f"{name}={value!r} is not accepted; expected an integer >= 1")


# --- language modelling ---------------------------------------------------------------------


class _RoutingTotals:
    """Routing statistics summed over batches: expert loads (for MaxVio, utilisation, dead
    experts, usage entropy) and token-weighted per-token router entropy, per MoE layer."""

    def __init__(self) -> None:
        self.loads = ExpertLoadAccumulator()
        self.token_entropy_sum_L: Tensor | None = None
        self.n_tokens_L: Tensor | None = None

    def update(self, routing: Sequence[RoutingInfo]) -> None:
        self.loads.update(torch.stack([info.expert_counts for info in routing]))
        n_tokens_L = torch.tensor([info.probs.shape[0] for info in routing], dtype=torch.float64)
        entropy_sum_L = (
            torch.stack([diagnostics.token_entropy(info.probs).cpu() for info in routing])
            * n_tokens_L
        )
        if self.token_entropy_sum_L is None:
            self.token_entropy_sum_L, self.n_tokens_L = entropy_sum_L, n_tokens_L
        else:
            self.token_entropy_sum_L += entropy_sum_L
            self.n_tokens_L += n_tokens_L

    def summary(self) -> dict:
        counts_LE = self.loads.total_counts_LE
        return {
            "max_violation_global": self.loads.max_violation_global(),
            "max_violation_batch": self.loads.max_violation_batch(),
            "expert_counts": counts_LE.round().long().tolist(),
            "expert_utilisation": diagnostics.expert_utilisation(counts_LE).tolist(),
            "dead_experts": diagnostics.dead_experts(counts_LE).tolist(),
            "usage_entropy": diagnostics.usage_entropy(counts_LE).tolist(),
            "token_entropy": (self.token_entropy_sum_L / self.n_tokens_L).tolist(),
        }


def evaluate_lm(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    max_batches: int | None = None,
) -> dict:
    """Perplexity and routing statistics over a set of batches (DESIGN.md §7, §4).

    Each batch holds ``input_ids`` and ``labels`` (B, S), labels already shifted, IGNORE_INDEX
    (-100) where no loss is taken (:mod:`moealign.data.batching`). Returns:

    * ``nll`` = Σ NLL / N over all N labelled tokens of the set (token-weighted, not a mean of
      batch means), ``perplexity`` = exp(nll), ``tokens`` = N, ``batches``;
    * for models with MoE layers, per layer l over every routed position of the set:
      ``max_violation_global`` (MaxVio of the summed loads, mean over l) and
      ``max_violation_batch`` (per-batch MaxVio, mean over batches), ``expert_counts`` (L × E),
      ``expert_utilisation`` load_e / mean load, ``dead_experts``, normalised ``usage_entropy``
      H(c/Σc)/log E, and ``token_entropy`` the mean over tokens of H(p_t)/log E. Dense models
      have no such entries.

    ``max_batches`` stops after that many batches.
    """
    if max_batches is not None:
        _check_positive_int("max_batches", max_batches)
    device = _model_device(model)
    total_nll = torch.zeros((), dtype=torch.float64, device=device)
    n_tokens = torch.zeros((), dtype=torch.long, device=device)
    n_batches = 0
    routing_totals: _RoutingTotals | None = None
    with _evaluation_mode(model):
        for batch in itertools.islice(batches, max_batches):
            missing = [key for key in ("input_ids", "labels") if key not in batch]
            if missing:
                raise ValueError(
                    f"batch {n_batches} lacks {missing}; evaluate_lm needs 'input_ids' and 'labels'"
                )
            input_ids_BS = batch["input_ids"].to(device)
            labels_BS = batch["labels"].to(device)
            output = model(input_ids_BS)
            nll_BS = F.cross_entropy(
                output.logits.float().transpose(1, 2),
                labels_BS,
                ignore_index=IGNORE_INDEX,
                reduction="none",
            )
            total_nll += nll_BS.double().sum()
            n_tokens += (labels_BS != IGNORE_INDEX).sum()
            if output.routing:
                routing_totals = routing_totals or _RoutingTotals()
                routing_totals.update(output.routing)
            n_batches += 1
    if n_batches == 0:
        raise ValueError("batches is empty; evaluate_lm needs at least one batch")
    if int(n_tokens) == 0:
        raise ValueError(
            f"the {n_batches} batches have no labelled token (every label is {IGNORE_INDEX})"
        )
    mean_nll = float(total_nll) / int(n_tokens)
    result = {
        "nll": mean_nll,
        "perplexity": perplexity(float(total_nll), int(n_tokens)),
        "tokens": int(n_tokens),
        "batches": n_batches,
    }
    if routing_totals is not None:
        result |= routing_totals.summary()
    return result


# --- greedy generation ----------------------------------------------------------------------


def _greedy_batch(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    budgets: Sequence[int],
    eos_id: int,
    max_length: int | None,
    device: torch.device,
) -> list[list[int]]:
    """Greedy decoding of one right-padded batch; finished rows leave the batch."""
    prompt_lengths = [len(p) for p in prompts]
    width = max(length + budget for length, budget in zip(prompt_lengths, budgets, strict=True))
    if max_length is not None:
        width = min(width, max_length)
    # Positions past a row's length are never read by its own logits (causal attention).
    tokens_BS = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens_BS[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    lengths_B = torch.tensor(prompt_lengths, dtype=torch.long, device=device)
    stop_at_B = lengths_B + torch.tensor(budgets, dtype=torch.long, device=device)
    active_A = torch.arange(len(prompts), device=device)
    for _ in range(max(budgets)):
        if active_A.numel() == 0:
            break
        lengths_A = lengths_B[active_A]
        logits_ASV = model(tokens_BS[active_A, : int(lengths_A.max())]).logits
        rows_A = torch.arange(active_A.numel(), device=device)
        next_A = logits_ASV[rows_A, lengths_A - 1].argmax(-1)
        tokens_BS[active_A, lengths_A] = next_A
        lengths_B[active_A] = lengths_A + 1
        finished_A = (next_A == eos_id) | (lengths_A + 1 >= stop_at_B[active_A])
        if max_length is not None:
            finished_A |= lengths_A + 1 >= max_length
        active_A = active_A[~finished_A]
    return [
        tokens_BS[row, prompt_length : int(lengths_B[row])].tolist()
        for row, prompt_length in enumerate(prompt_lengths)
    ]


def greedy_generate(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int | Sequence[int],
    eos_id: int,
    batch_size: int = 32,
) -> list[list[int]]:
    """Greedy decoding: x_{n+1} = argmax_v logits(x_1..x_n)_v, batched.

    For each prompt returns the generated ids, stopping after EOS (returned as the last id, so a
    caller can tell a finished generation from a truncated one), after ``max_new_tokens``
    tokens (one budget for all prompts, or one per prompt), or when the sequence reaches
    ``model.config.max_seq_len``. No KV
    cache: every step recomputes the full prefix. Prompts are sorted by length into batches of
    ``batch_size`` right-padded rows (exact for causal models; see the module docstring).
    """
    budgets = (
        [max_new_tokens] * len(prompt_ids)
        if isinstance(max_new_tokens, int)
        else list(max_new_tokens)
    )
    if len(budgets) != len(prompt_ids):
        raise ValueError(f"max_new_tokens has {len(budgets)} budgets for {len(prompt_ids)} prompts")
    for budget in budgets:
        _check_positive_int("max_new_tokens", budget)
    _check_positive_int("batch_size", batch_size)
    max_length = _max_sequence_length(model)
    for index, prompt in enumerate(prompt_ids):
        if len(prompt) == 0:
            raise ValueError(f"prompt_ids[{index}] is empty; generation needs a prompt token")
        if max_length is not None and len(prompt) >= max_length:
            raise ValueError(
                f"prompt_ids[{index}] has {len(prompt)} tokens, leaving no room to generate "
                f"within model.max_seq_len={max_length}"
            )
    device = _model_device(model)
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    generated: list[list[int]] = [[] for _ in prompt_ids]
    with _evaluation_mode(model):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = _greedy_batch(
                model,
                [prompt_ids[i] for i in rows],
                [budgets[i] for i in rows],
                eos_id,
                max_length,
                device,
            )
            for row, ids in zip(rows, batch, strict=True):
                generated[row] = ids
    return generated


# --- task accuracy --------------------------------------------------------------------------


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
        """Per-example correctness per task, the input :func:`moealign.ctgi.ctgi` expects."""
        return {task: result.correct for task, result in self.tasks.items()}

    def to_dict(self) -> dict:
        return {
            "accuracy": self.macro_accuracy,
            "tasks": {task: result.to_dict() for task, result in self.tasks.items()},
        }


def _group_by_task(examples: Sequence[TaskExample]) -> dict[str, list[TaskExample]]:
    if not examples:
        raise ValueError("examples is empty; give at least one TaskExample")
    groups: dict[str, list[TaskExample]] = {}
    for example in examples:
        groups.setdefault(example.task, []).append(example)
    return groups


def _task_kind(task: str) -> str:
    if task not in TASK_FAMILIES:
        raise ValueError(f"task={task!r} is not a known task; known tasks: {sorted(TASK_FAMILIES)}")
    return TASK_FAMILIES[task].kind


def _score_answers(
    task: str,
    kind: str,
    predictions: list[str],
    references: list[str],
    complete: Sequence[bool] | None = None,
) -> TaskResult:
    """Exact match after whitespace normalisation per example (an incomplete prediction, when
    ``complete`` is given, is wrong); BLEU and ROUGE-L on the same strings for generation tasks
    (:mod:`moealign.metrics`)."""
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
        _check_positive_int("max_new_tokens", max_new_tokens)
    groups = _group_by_task(examples)
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
        results[task] = _score_answers(task, _task_kind(task), predictions, references, complete)
    return TaskEvaluation(results)


def evaluate_suite(
    model: nn.Module,
    tokenizer: Tokenizer,
    suite: TaskSuite,
    max_new_tokens: int | None = None,
    batch_size: int = 32,
    max_examples_per_task: int | None = None,
) -> dict:
    """:func:`evaluate_tasks` on every non-empty set of ``suite.evaluation_sets()`` (seen-task
    test, held-out tasks, held-out compositions, long lengths), on at most
    ``max_examples_per_task`` examples of each task per set (the first ones; None = all).

    Returns ``{"sets": {set: TaskEvaluation.to_dict()}, "seen_mean", "heldout_mean"}``:
    ``seen_mean`` is the macro accuracy on the seen-task test split, ``heldout_mean`` the mean
    task accuracy over the held-out tasks and held-out compositions together (None when the
    suite holds none out).
    """
    evaluations = {
        name: evaluate_tasks(
            model,
            tokenizer,
            _first_per_task(examples, max_examples_per_task),
            max_new_tokens,
            batch_size,
        )
        for name, examples in suite.evaluation_sets().items()
        if examples
    }
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


def _first_per_task(examples: Sequence[TaskExample], limit: int | None) -> list[TaskExample]:
    if limit is None:
        return list(examples)
    return [ex for group in _group_by_task(examples).values() for ex in group[:limit]]


# --- multiple choice ------------------------------------------------------------------------


def _continuation_log_likelihoods(
    model: nn.Module,
    pairs: Sequence[tuple[list[int], list[int]]],
    pad_id: int,
    batch_size: int,
) -> list[float]:
    """Σ_i log p(c_i | prompt, c_<i) for each (prompt ids, continuation ids) pair, in float64
    sums of fp32 log-softmax values; right-padded batches sorted by length."""
    device = _model_device(model)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    scores = [0.0] * len(pairs)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        sequences = [pairs[i][0] + pairs[i][1] for i in rows]
        width = max(len(s) for s in sequences) - 1
        input_ids_BS = torch.full((len(rows), width), pad_id, dtype=torch.long)
        targets_BS = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for b, (row, sequence) in enumerate(zip(rows, sequences, strict=True)):
            input_ids_BS[b, : len(sequence) - 1] = torch.tensor(sequence[:-1])
            # Position s predicts token s + 1; the continuation starts at token len(prompt).
            prompt_length = len(pairs[row][0])
            targets_BS[b, prompt_length - 1 : len(sequence) - 1] = torch.tensor(
                sequence[prompt_length:]
            )
        input_ids_BS, targets_BS = input_ids_BS.to(device), targets_BS.to(device)
        log_probs_BSV = model(input_ids_BS).logits.float().log_softmax(-1)
        scored_BS = targets_BS != IGNORE_INDEX
        token_log_probs_BS = log_probs_BSV.gather(-1, targets_BS.clamp_min(0).unsqueeze(-1))
        sums_B = (token_log_probs_BS.squeeze(-1).double() * scored_BS).sum(-1)
        for row, value in zip(rows, sums_B.tolist(), strict=True):
            scores[row] = value
    return scores


def _option_candidates(
    example: TaskExample, index: int, continuation: str
) -> tuple[list[str], int]:
    """The strings to score and the gold option's index, for one multiple-choice example."""
    letters = OPTION_LETTERS[: len(example.options)]
    if not example.options or example.answer not in letters:
        raise ValueError(
            f"examples[{index}] (task {example.task!r}) is not a multiple-choice example: "
            f"options={example.options!r}, answer={example.answer!r}; expected options and an "
            f"answer among {list(letters)} (see moealign.data.to_multiple_choice)"
        )
    candidates = list(example.options) if continuation == "text" else list(letters)
    return candidates, letters.index(example.answer)


def option_log_likelihoods(
    model: nn.Module,
    tokenizer: Tokenizer,
    examples: Sequence[TaskExample],
    continuation: Literal["text", "letter"] = "text",
    batch_size: int = 32,
) -> list[list[float]]:
    """Per example, per option, log p(answer ids | prompt ids) = Σ over the option's answer ids
    (``ANSWER_SEPARATOR + option`` and EOS, as :func:`encode_example` encodes an answer) of the
    token log-probabilities after the prompt.

    ``continuation="text"`` scores the option texts (``example.options``, the lm-eval-harness
    way); ``"letter"`` scores the option letters A, B, ... (the RoMA code's way).
    """
    if continuation not in MULTIPLE_CHOICE_CONTINUATIONS:
        raise ValueError(
            f"continuation={continuation!r} is not accepted; choose one of "
            f"{MULTIPLE_CHOICE_CONTINUATIONS}"
        )
    _check_positive_int("batch_size", batch_size)
    if not examples:
        raise ValueError("examples is empty; give at least one multiple-choice TaskExample")
    pairs, n_options = [], []
    for index, example in enumerate(examples):
        candidates, _ = _option_candidates(example, index, continuation)
        pairs += [encode_example(replace(example, answer=c), tokenizer) for c in candidates]
        n_options.append(len(candidates))
    with _evaluation_mode(model):
        flat = _continuation_log_likelihoods(model, pairs, tokenizer.pad_id, batch_size)
    offsets = np.cumsum([0, *n_options])
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(examples))]


def score_multiple_choice(
    model: nn.Module,
    tokenizer: Tokenizer,
    examples: Sequence[TaskExample],
    continuation: Literal["text", "letter"] = "text",
    batch_size: int = 32,
) -> TaskEvaluation:
    """Multiple-choice accuracy per task by log-likelihood: the prediction is the option with the
    largest :func:`option_log_likelihoods` (the first on ties); predictions and references are
    option letters and ``correct[i]`` is 1 when the prediction is the gold letter."""
    log_likelihoods = option_log_likelihoods(model, tokenizer, examples, continuation, batch_size)
    by_task: dict[str, tuple[list[str], list[str]]] = {}
    for example, scores in zip(examples, log_likelihoods, strict=True):
        predictions, references = by_task.setdefault(example.task, ([], []))
        predictions.append(OPTION_LETTERS[int(np.argmax(scores))])
        references.append(example.answer)
    return TaskEvaluation(
        {
            task: _score_answers(task, "multiple_choice", predictions, references)
            for task, (predictions, references) in by_task.items()
        }
    )


# --- router geometry ------------------------------------------------------------------------


def routing_projection_alignment(model: nn.Module) -> list[float]:
    """Per MoE layer (depth order) the mean over experts of the projection alignment
    λ_e = ‖W_g[e] r_e‖₂ / (‖r_e‖₂ σ_max(W_g[e])) (DESIGN.md §3, MPI paper Eq. 11), with r_e
    the effective router row: C · retract(power(R)) for MPI routers, the raw row otherwise."""
    alignments = []
    for layer in model.modules():
        if not isinstance(layer, MoELayer):
            continue
        router = layer.router
        with torch.no_grad():
            if isinstance(router, MPIRouter):
                rows_ED = router.effective_weight(layer.router_drive_matrix())
            else:
                rows_ED = router.weight
            alignment_E = diagnostics.projection_alignment(rows_ED, layer.experts.w_gate)
        alignments.append(float(alignment_E.mean()))
    return alignments
