"""Multiple-choice scoring by log-likelihood (DESIGN.md §7): per option
log p(answer ids | prompt ids), the lm-evaluation-harness way (option texts) or the RoMA code's
way (option letters).

Shape letters: B rows, S positions, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Literal

import numpy as np
import torch
from torch import nn

from moealign.data.batching import IGNORE_INDEX, encode_example
from moealign.data.tasks import OPTION_LETTERS, TaskExample
from moealign.data.tokenizer import Tokenizer
from moealign.evaluation.common import check_positive_int, evaluation_mode, model_device
from moealign.evaluation.tasks import TaskEvaluation, score_answers

MULTIPLE_CHOICE_CONTINUATIONS = ("text", "letter")


def _continuation_log_likelihoods(
    model: nn.Module,
    pairs: Sequence[tuple[list[int], list[int]]],
    pad_id: int,
    batch_size: int,
) -> list[float]:
    """Σ_i log p(c_i | prompt, c_<i) for each (prompt ids, continuation ids) pair, in float64
    sums of fp32 log-softmax values; right-padded batches sorted by length."""
    device = model_device(model)
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
    with_eos: bool = True,
) -> list[list[float]]:
    """Per example, per option, log p(answer ids | prompt ids) = Σ over the option's answer ids
    (``ANSWER_SEPARATOR + option`` and EOS, as :func:`encode_example` encodes an answer) of the
    token log-probabilities after the prompt.

    ``continuation="text"`` scores the option texts (``example.options``, the lm-eval-harness
    way); ``"letter"`` scores the option letters A, B, ... (the RoMA code's way).
    ``with_eos=False`` leaves the closing EOS out of the sum, as lm-evaluation-harness's
    ``multiple_choice`` tasks score a choice (its ``target_delimiter`` " " is
    ``ANSWER_SEPARATOR``).
    """
    if continuation not in MULTIPLE_CHOICE_CONTINUATIONS:
        raise ValueError(
            f"continuation={continuation!r} is not accepted; choose one of "
            f"{MULTIPLE_CHOICE_CONTINUATIONS}"
        )
    check_positive_int("batch_size", batch_size)
    if not examples:
        raise ValueError("examples is empty; give at least one multiple-choice TaskExample")
    pairs, n_options = [], []
    for index, example in enumerate(examples):
        candidates, _ = _option_candidates(example, index, continuation)
        for candidate in candidates:
            prompt_ids, answer_ids = encode_example(replace(example, answer=candidate), tokenizer)
            pairs.append((prompt_ids, answer_ids if with_eos else answer_ids[:-1]))
        n_options.append(len(candidates))
    with evaluation_mode(model):
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
            task: score_answers(task, "multiple_choice", predictions, references)
            for task, (predictions, references) in by_task.items()
        }
    )
