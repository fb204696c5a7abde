"""Multiple-choice scoring and routing capture through :class:`moealign.nn.routed.RoutedModel`.

An option's answer continuation is ``ANSWER_SEPARATOR + answer + EOS`` as
:func:`moealign.data.encode_example` encodes it. Two scorings (``continuation``):

* ``"letter"`` (the released RoMA code's task loss, a CE over the next-token logits of the
  option letters): one row per question, the prompt followed by the part the letter
  continuations share; s_o = log p(c_o | prompt, shared part), c_o the first token where the
  letters differ;
* ``"text"`` (lm-evaluation-harness's log-likelihood scoring): one row per option,
  s_o = Σ_t log p(c_o,t | prompt, c_o,<t) over the option text's continuation.

The routed token is the last prompt token (``token="last"``, RoMA's Last1) or the first one; as
every row of a question starts with the prompt, its routing there is the same in all of them
(causal attention). The routing vector is r = concat over the chosen MoE layers of the full
routing softmax at that token, shape (L·E,).

Shape letters: B questions, R rows, S positions, V vocabulary, O options, T scored tokens,
L layers, E experts, P = L·E routing-vector width.
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
from moealign.evaluation.tasks import TaskEvaluation, TaskResult
from moealign.nn.routed import RoutedModel, RoutedOutput

TOKENS = ("last", "first")
CONTINUATIONS = ("letter", "text")


@dataclass
class EncodedQuestion:
    """A question's rows (input ids), its routed position, its scored tokens
    ``(row, position, token id, option)`` and its gold option."""

    rows: list[list[int]]
    routed_position: int
    scored: list[tuple[int, int, int, int]]
    n_options: int
    gold: int


@dataclass
class ChoiceBatch:
    """Right-padded rows of several questions.

    ``input_ids_RS``; ``question_R`` (each row's question) and ``routed_position_R``;
    ``first_row_B`` (a row of each question, where its routing is read) and
    ``routed_position_B``; the scored tokens ``score_row_T``, ``score_position_T``,
    ``score_token_T`` adding into option slot ``score_slot_T`` = question · O + option;
    ``option_mask_BO`` (questions may have fewer options) and ``gold_B``.
    """

    input_ids_RS: Tensor
    question_R: Tensor
    routed_position_R: Tensor
    first_row_B: Tensor
    routed_position_B: Tensor
    score_row_T: Tensor
    score_position_T: Tensor
    score_token_T: Tensor
    score_slot_T: Tensor
    option_mask_BO: Tensor
    gold_B: Tensor

    def to(self, device: torch.device) -> ChoiceBatch:
        return ChoiceBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def _check_example(example: TaskExample, index: int) -> str:
    letters = OPTION_LETTERS[: len(example.options)]
    if len(example.options) < 2 or example.answer not in letters:
        raise ValueError(
            f"examples[{index}] (task {example.task!r}) is not a multiple-choice example: "
            f"options={example.options!r}, answer={example.answer!r}; expected >= 2 options and "
            "an answer among their letters (see moealign.data.multiple_choice_view)"
        )
    return letters


def encode_question(
    example: TaskExample,
    tokenizer: Tokenizer,
    token: str = "last",
    continuation: str = "letter",
    index: int = 0,
) -> EncodedQuestion:
    """The scored rows of one multiple-choice example (see the module docstring)."""
    if token not in TOKENS:
        raise ValueError(f"token={token!r} is not accepted; choose one of {TOKENS}")
    if continuation not in CONTINUATIONS:
        raise ValueError(
            f"continuation={continuation!r} is not accepted; choose one of {CONTINUATIONS}"
        )
    letters = _check_example(example, index)
    prompt_ids, _ = encode_example(example, tokenizer)
    routed_position = len(prompt_ids) - 1 if token == "last" else 0
    answers = letters if continuation == "letter" else example.options
    continuations = [encode_example(replace(example, answer=a), tokenizer)[1] for a in answers]
    gold = letters.index(example.answer)
    if continuation == "text":
        rows, scored = [], []
        for option, ids in enumerate(continuations):
            sequence = prompt_ids + ids
            rows.append(sequence[:-1])
            # Position s predicts token s + 1; the continuation starts at token len(prompt).
            scored += [
                (option, s - 1, sequence[s], option) for s in range(len(prompt_ids), len(sequence))
            ]
        return EncodedQuestion(rows, routed_position, scored, len(answers), gold)
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
            "them by one next-token distribution; use continuation='text'"
        )
    row = prompt_ids + continuations[0][:shared]
    scored = [(0, len(row) - 1, token_id, o) for o, token_id in enumerate(option_ids)]
    return EncodedQuestion([row], routed_position, scored, len(answers), gold)


def collate(questions: Sequence[EncodedQuestion], pad_id: int) -> ChoiceBatch:
    rows = [row for q in questions for row in q.rows]
    width = max(len(row) for row in rows)
    n_options = max(q.n_options for q in questions)
    input_ids_RS = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for r, row in enumerate(rows):
        input_ids_RS[r, : len(row)] = torch.tensor(row)
    question_R, routed_position_R, first_row_B, scored = [], [], [], []
    option_mask_BO = torch.zeros(len(questions), n_options, dtype=torch.bool)
    for b, question in enumerate(questions):
        first_row_B.append(len(question_R))
        scored += [
            (first_row_B[-1] + row, position, token, b * n_options + option)
            for row, position, token, option in question.scored
        ]
        question_R += [b] * len(question.rows)
        routed_position_R += [question.routed_position] * len(question.rows)
        option_mask_BO[b, : question.n_options] = True
    score_row_T, score_position_T, score_token_T, score_slot_T = torch.tensor(scored).T
    return ChoiceBatch(
        input_ids_RS=input_ids_RS,
        question_R=torch.tensor(question_R),
        routed_position_R=torch.tensor(routed_position_R),
        first_row_B=torch.tensor(first_row_B),
        routed_position_B=torch.tensor([q.routed_position for q in questions]),
        score_row_T=score_row_T,
        score_position_T=score_position_T,
        score_token_T=score_token_T,
        score_slot_T=score_slot_T,
        option_mask_BO=option_mask_BO,
        gold_B=torch.tensor([q.gold for q in questions]),
    )


def option_scores(output: RoutedOutput, batch: ChoiceBatch) -> Tensor:
    """s_bo = Σ over the option's scored tokens of log_softmax(logits)[token]; −inf on padding."""
    log_probs_TV = output.logits[batch.score_row_T, batch.score_position_T].float().log_softmax(-1)
    token_log_probs_T = log_probs_TV.gather(-1, batch.score_token_T.unsqueeze(-1)).squeeze(-1)
    n_questions, n_options = batch.option_mask_BO.shape
    scores = token_log_probs_T.new_zeros(n_questions * n_options)
    scores_BO = scores.index_add(0, batch.score_slot_T, token_log_probs_T).view(n_questions, -1)
    return scores_BO.masked_fill(~batch.option_mask_BO, -torch.inf)


def choice_loss(scores_BO: Tensor, gold_B: Tensor) -> Tensor:
    """Mean CE over the options: −log softmax_o(s_bo)[gold_b]."""
    return F.cross_entropy(scores_BO, gold_B)


def routing_per_layer(output: RoutedOutput, layers: Sequence[int], batch: ChoiceBatch) -> Tensor:
    """Each question's full routing softmax at its routed token, per chosen layer: (B, L, E)."""
    return torch.stack(
        [output.probs[layer][batch.first_row_B, batch.routed_position_B] for layer in layers],
        dim=1,
    )


def routing_vector(output: RoutedOutput, layers: Sequence[int], batch: ChoiceBatch) -> Tensor:
    """r_b = concat over ``layers`` of the routing at question b's routed token: (B, L·E)."""
    return routing_per_layer(output, layers, batch).flatten(1)


def replace_at_positions(
    batch: ChoiceBatch, new_probs: Callable[[Tensor], Tensor]
) -> Callable[[Tensor], Tensor]:
    """A :data:`moealign.nn.routed.ProbsOverride` replacing every row's routing at its routed
    position by ``new_probs(probs_RE)`` (probs_RE: the layer's own routing there; row r belongs
    to question ``batch.question_R[r]``) and leaving every other position untouched;
    differentiable in what ``new_probs`` returns."""
    position_R = batch.routed_position_R

    def override(probs_RSE: Tensor) -> Tensor:
        rows_R = torch.arange(probs_RSE.shape[0], device=probs_RSE.device)
        current_RE = probs_RSE[rows_R, position_R]
        at_RS1 = F.one_hot(position_R, probs_RSE.shape[1]).bool().unsqueeze(-1)
        return torch.where(at_RS1, new_probs(current_RE).to(probs_RSE.dtype)[:, None], probs_RSE)

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
    examples: Sequence[TaskExample], tokenizer: Tokenizer, token: str, continuation: str
) -> list[EncodedQuestion]:
    if not examples:
        raise ValueError("examples is empty; give at least one multiple-choice TaskExample")
    return [encode_question(e, tokenizer, token, continuation, i) for i, e in enumerate(examples)]


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
        routing_BP = routing_vector(output, layers, batch).detach()
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
    continuation: str = "letter",
    batch_size: int = 64,
    overrides_for: Callable[[range, ChoiceBatch], dict] | None = None,
) -> Capture:
    """Run the model over ``examples``: routing vectors at the routed token, predictions and
    correctness. ``overrides_for(rows, batch)`` may return per-batch routing overrides
    (:meth:`RoutedModel.override_routing`), e.g. C3PO's re-mixing."""
    questions = encode_questions(examples, tokenizer, token, continuation)
    result = CaptureBuilder()
    with frozen_eval(routed):
        for rows, batch in batches(questions, batch_size, tokenizer.pad_id, model_device(routed)):
            overrides = overrides_for(rows, batch) if overrides_for is not None else {}
            with routed.override_routing(overrides):
                result.add(routed.forward(batch.input_ids_RS), batch, layers)
    return result.build()


def task_evaluation(examples: Sequence[TaskExample], prediction_N: Tensor) -> TaskEvaluation:
    """Per-task accuracy and per-example correctness (a :class:`TaskEvaluation`, the format of
    :func:`moealign.evaluation.multiple_choice.score_multiple_choice`)."""
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
