"""Multiple-choice scoring and routing capture through :class:`moealign.routed.RoutedModel`.

One row per question: the prompt ids followed by the part the answer continuations
``ANSWER_SEPARATOR + letter + EOS`` (as :func:`moealign.data.encode_example` encodes them)
share; the option score is the log-probability of the option's first distinguishing token at
the row's last position, s_o = log p(c_o | prompt, shared prefix). This is the released RoMA
code's task loss (a CE over the next-token logits of the option letters), at one forward pass
per question instead of one per option.

The routed token is the last prompt token (``token="last"``, RoMA's Last1: the ":" of
"answer:") or the first one; its routing vector is r = concat over the chosen MoE layers of the
full routing softmax, shape (L·E,).

Shape letters: B questions, S positions, V vocabulary, O options, L layers, E experts,
P = L·E routing-vector width.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from moealign.data.batching import encode_example
from moealign.data.tasks import OPTION_LETTERS, TaskExample
from moealign.data.tokenizer import Tokenizer
from moealign.evaluate import TaskEvaluation, TaskResult
from moealign.routed import RoutedModel, RoutedOutput

TOKENS = ("last", "first")


@dataclass
class EncodedQuestion:
    input_ids: list[int]
    routed_position: int
    option_ids: list[int]
    gold: int


@dataclass
class ChoiceBatch:
    """Right-padded questions: ``input_ids_BS``, ``routed_position_B`` (the routed token),
    ``score_position_B`` (last real position), ``option_ids_BO`` with ``option_mask_BO``
    (questions may have fewer options), ``gold_B``."""

    input_ids_BS: Tensor
    routed_position_B: Tensor
    score_position_B: Tensor
    option_ids_BO: Tensor
    option_mask_BO: Tensor
    gold_B: Tensor

    def to(self, device: torch.device) -> ChoiceBatch:
        return ChoiceBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def encode_question(
    example: TaskExample, tokenizer: Tokenizer, token: str = "last", index: int = 0
) -> EncodedQuestion:
    """The scored row of one multiple-choice example (see the module docstring)."""
    if token not in TOKENS:
        raise ValueError(f"token={token!r} is not accepted; choose one of {TOKENS}")
    letters = OPTION_LETTERS[: len(example.options)]
    if len(example.options) < 2 or example.answer not in letters:
        raise ValueError(
            f"examples[{index}] (task {example.task!r}) is not a multiple-choice example: "
            f"options={example.options!r}, answer={example.answer!r}; expected >= 2 options and "
            "an answer among their letters (see moealign.data.multiple_choice_view)"
        )
    prompt_ids, _ = encode_example(example, tokenizer)
    continuations = [encode_example(replace(example, answer=c), tokenizer)[1] for c in letters]
    shared = 0
    while all(len(c) > shared + 1 for c in continuations) and (
        len({c[shared] for c in continuations}) == 1
    ):
        shared += 1
    option_ids = [c[shared] for c in continuations]
    if len(set(option_ids)) != len(option_ids):
        raise ValueError(
            f"examples[{index}]: the option letters {list(letters)} do not start with distinct "
            f"tokens after their shared prefix (ids {option_ids}); this tokenizer cannot score "
            "them by one next-token distribution"
        )
    return EncodedQuestion(
        input_ids=prompt_ids + continuations[0][:shared],
        routed_position=len(prompt_ids) - 1 if token == "last" else 0,
        option_ids=option_ids,
        gold=letters.index(example.answer),
    )


def collate(questions: Sequence[EncodedQuestion], pad_id: int) -> ChoiceBatch:
    width = max(len(q.input_ids) for q in questions)
    n_options = max(len(q.option_ids) for q in questions)
    input_ids_BS = torch.full((len(questions), width), pad_id, dtype=torch.long)
    option_ids_BO = torch.zeros(len(questions), n_options, dtype=torch.long)
    option_mask_BO = torch.zeros(len(questions), n_options, dtype=torch.bool)
    for b, question in enumerate(questions):
        input_ids_BS[b, : len(question.input_ids)] = torch.tensor(question.input_ids)
        option_ids_BO[b, : len(question.option_ids)] = torch.tensor(question.option_ids)
        option_mask_BO[b, : len(question.option_ids)] = True
    return ChoiceBatch(
        input_ids_BS=input_ids_BS,
        routed_position_B=torch.tensor([q.routed_position for q in questions]),
        score_position_B=torch.tensor([len(q.input_ids) - 1 for q in questions]),
        option_ids_BO=option_ids_BO,
        option_mask_BO=option_mask_BO,
        gold_B=torch.tensor([q.gold for q in questions]),
    )


def option_scores(output: RoutedOutput, batch: ChoiceBatch) -> Tensor:
    """s_bo = log_softmax(logits at the row's last position)[option token], −inf on padding."""
    rows_B = torch.arange(batch.gold_B.shape[0], device=output.logits.device)
    log_probs_BV = output.logits[rows_B, batch.score_position_B].float().log_softmax(-1)
    scores_BO = log_probs_BV.gather(-1, batch.option_ids_BO)
    return scores_BO.masked_fill(~batch.option_mask_BO, -torch.inf)


def choice_loss(scores_BO: Tensor, gold_B: Tensor) -> Tensor:
    """Mean CE over the options: −log softmax_o(s_bo)[gold_b]."""
    return F.cross_entropy(scores_BO, gold_B)


def routing_vector(output: RoutedOutput, layers: Sequence[int], position_B: Tensor) -> Tensor:
    """r_b = concat over ``layers`` of the full routing softmax at ``position_B[b]``: (B, L·E)."""
    return routing_per_layer(output, layers, position_B).flatten(1)


def routing_per_layer(output: RoutedOutput, layers: Sequence[int], position_B: Tensor) -> Tensor:
    """The same routing as (B, L, E)."""
    rows_B = torch.arange(position_B.shape[0], device=position_B.device)
    return torch.stack([output.probs[layer][rows_B, position_B] for layer in layers], dim=1)


def replace_at_positions(
    position_B: Tensor, new_probs: Callable[[Tensor], Tensor]
) -> Callable[[Tensor], Tensor]:
    """A :data:`moealign.routed.ProbsOverride` replacing row b's routing at ``position_B[b]`` by
    ``new_probs(probs_BE)`` (probs_BE: the layer's own routing there) and leaving every other
    position untouched; differentiable in what ``new_probs`` returns."""

    def override(probs_BSE: Tensor) -> Tensor:
        rows_B = torch.arange(probs_BSE.shape[0], device=probs_BSE.device)
        current_BE = probs_BSE[rows_B, position_B]
        at_BS1 = F.one_hot(position_B, probs_BSE.shape[1]).bool().unsqueeze(-1)
        return torch.where(at_BS1, new_probs(current_BE).to(probs_BSE.dtype)[:, None], probs_BSE)

    return override


@contextlib.contextmanager
def frozen_eval(routed: RoutedModel) -> Iterator[None]:
    """Eval mode (no dropout, jitter or expert-bias counting) for the duration."""
    was_training = routed.model.training
    routed.model.eval()
    try:
        yield
    finally:
        routed.model.train(was_training)


@contextlib.contextmanager
def only_trainable(routed: RoutedModel, parameters: Sequence[torch.nn.Parameter]) -> Iterator[None]:
    """requires_grad=True for ``parameters`` only, every other model tensor frozen, for the
    duration; the previous flags are restored afterwards."""
    flags = [(p, p.requires_grad) for p in routed.model.parameters()]
    trainable = {id(p) for p in parameters}
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in trainable)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def model_device(routed: RoutedModel) -> torch.device:
    return next(routed.model.parameters()).device


def encode_questions(
    examples: Sequence[TaskExample], tokenizer: Tokenizer, token: str
) -> list[EncodedQuestion]:
    if not examples:
        raise ValueError("examples is empty; give at least one multiple-choice TaskExample")
    return [encode_question(e, tokenizer, token, i) for i, e in enumerate(examples)]


def batches(
    questions: Sequence[EncodedQuestion], batch_size: int, pad_id: int, device: torch.device
) -> Iterator[tuple[range, ChoiceBatch]]:
    """Consecutive batches (index range, batch on ``device``)."""
    for start in range(0, len(questions), batch_size):
        rows = range(start, min(start + batch_size, len(questions)))
        yield rows, collate([questions[i] for i in rows], pad_id).to(device)


@dataclass
class Capture:
    """Per example: ``routing_NP`` (its routing vector), ``correct_N`` (bool),
    ``prediction_N`` (argmax option index, the first on ties) and ``gold_log_prob_N`` (log
    softmax over the options of the gold one, −CE)."""

    routing_NP: Tensor
    correct_N: Tensor
    prediction_N: Tensor
    gold_log_prob_N: Tensor


class CaptureBuilder:
    """Accumulates :class:`Capture` rows batch by batch."""

    def __init__(self) -> None:
        self.parts: list[tuple[Tensor, ...]] = []

    def add(self, output: RoutedOutput, batch: ChoiceBatch, layers: Sequence[int]) -> None:
        scores_BO = option_scores(output, batch).detach()
        gold_B = batch.gold_B
        rows_B = torch.arange(gold_B.shape[0], device=gold_B.device)
        gold_log_prob_B = scores_BO.log_softmax(-1)[rows_B, gold_B]
        routing_BP = routing_vector(output, layers, batch.routed_position_B).detach()
        prediction_B = scores_BO.argmax(-1)
        self.parts.append(
            tuple(
                t.cpu()
                for t in (routing_BP.float(), prediction_B == gold_B, prediction_B, gold_log_prob_B)
            )
        )

    def build(self) -> Capture:
        return Capture(*(torch.cat(column) for column in zip(*self.parts, strict=True)))


@torch.no_grad()
def capture(
    routed: RoutedModel,
    tokenizer: Tokenizer,
    examples: Sequence[TaskExample],
    layers: Sequence[int],
    token: str = "last",
    batch_size: int = 64,
    overrides_for: Callable[[range, ChoiceBatch], dict] | None = None,
) -> Capture:
    """Run the model over ``examples``: routing vectors at the routed token, predictions and
    correctness. ``overrides_for(rows, batch)`` may return per-batch routing overrides
    (:meth:`RoutedModel.override_routing`), e.g. C3PO's re-mixing."""
    questions = encode_questions(examples, tokenizer, token)
    result = CaptureBuilder()
    with frozen_eval(routed):
        for rows, batch in batches(questions, batch_size, tokenizer.pad_id, model_device(routed)):
            overrides = overrides_for(rows, batch) if overrides_for is not None else {}
            with routed.override_routing(overrides):
                result.add(routed.forward(batch.input_ids_BS), batch, layers)
    return result.build()


def task_evaluation(examples: Sequence[TaskExample], prediction_N: Tensor) -> TaskEvaluation:
    """Per-task accuracy and per-example correctness (a :class:`TaskEvaluation`, the format of
    :func:`moealign.evaluate.score_multiple_choice`)."""
    by_task: dict[str, tuple[list[str], list[str]]] = {}
    for example, option in zip(examples, prediction_N.tolist(), strict=True):
        predictions, references = by_task.setdefault(example.task, ([], []))
        predictions.append(OPTION_LETTERS[option])
        references.append(example.answer)
    results = {}
    for task, (predictions, references) in by_task.items():
        correct = [int(p == r) for p, r in zip(predictions, references, strict=True)]
        results[task] = TaskResult(
            task, "multiple_choice", sum(correct) / len(correct), correct, predictions, references
        )
    return TaskEvaluation(results)
