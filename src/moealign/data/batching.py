"""Batches for the trainer (DESIGN.md §7): packed text blocks, task sequences, and a resumable
stream that interleaves them.

A batch is a dict of CPU LongTensors of shape (B, S):

* ``input_ids``: token ids;
* ``labels``: ``labels[b, s]`` is the target for position s, i.e. the next token
  ``tokens[b, s + 1]`` (already shifted), or ``IGNORE_INDEX`` (-100) where no loss is taken;
* ``task_ids``: the task id of the example on every position it occupies (prompt and answer),
  ``NO_TASK`` (-1) on text blocks and padding.

Everything is a pure function of (data, seed, epoch, position), so a stream restored from
:meth:`BatchStream.state_dict` yields exactly the batches an uninterrupted stream would.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Literal

import torch

from moealign.data.tasks import TaskExample
from moealign.data.tokenizer import Tokenizer

IGNORE_INDEX = -100
NO_TASK = -1
# Text between the prompt and the answer ("reverse: a b =" + " " + "b a").
ANSWER_SEPARATOR = " "
SEQUENCE_KEYS = ("input_ids", "labels", "task_ids")

Sequences = dict[str, torch.Tensor]  # SEQUENCE_KEYS -> (N, S) LongTensors


def pack_lm_blocks(
    documents_ids: Sequence[Sequence[int]], seq_len: int, eos_id: int
) -> torch.Tensor:
    """Concatenate the documents, each followed by ``eos_id``, and cut the stream into
    ``N = len(stream) // (seq_len + 1)`` blocks of ``seq_len + 1`` tokens (the remainder is
    dropped). Returns blocks_NS1, a (N, seq_len + 1) LongTensor."""
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be at least 1")
    stream = [token for ids in documents_ids for token in (*ids, eos_id)]
    if len(stream) < seq_len + 1:
        raise ValueError(
            f"the text has {len(stream)} tokens (with EOS), too short for one block of "
            f"seq_len + 1 = {seq_len + 1} tokens; give more text or a smaller seq_len"
        )
    n_blocks = len(stream) // (seq_len + 1)
    return torch.tensor(stream[: n_blocks * (seq_len + 1)], dtype=torch.long).view(n_blocks, -1)


def lm_sequences(blocks_NS1: torch.Tensor) -> Sequences:
    """Blocks of S + 1 tokens to (input = first S, labels = last S, task_ids = NO_TASK)."""
    input_ids_NS = blocks_NS1[:, :-1].contiguous()
    return {
        "input_ids": input_ids_NS,
        "labels": blocks_NS1[:, 1:].contiguous(),
        "task_ids": torch.full_like(input_ids_NS, NO_TASK),
    }


def encode_example(example: TaskExample, tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids + EOS). The two parts are encoded separately so the boundary is
    exact and the evaluator can feed the same prompt ids and compare the same answer ids."""
    prompt_ids = tokenizer.encode(example.prompt)
    answer_ids = tokenizer.encode(ANSWER_SEPARATOR + example.answer) + [tokenizer.eos_id]
    return prompt_ids, answer_ids


def task_examples_to_sequences(
    examples: Sequence[TaskExample],
    tokenizer: Tokenizer,
    seq_len: int,
    task_id_fn: Callable[[str], int],
    loss_on: Literal["answer", "all"] = "answer",
) -> Sequences:
    """Each example as one row: tokens = prompt + answer + EOS (n <= seq_len + 1 tokens),
    input_ids = tokens[:-1], labels = tokens[1:], right-padded to ``seq_len`` with PAD /
    IGNORE_INDEX / NO_TASK. With ``loss_on="answer"`` the labels are IGNORE_INDEX except where
    the target is an answer token or the final EOS."""
    if loss_on not in ("answer", "all"):
        raise ValueError(f"loss_on={loss_on!r} is not accepted; accepted: 'answer', 'all'")
    if not examples:
        raise ValueError("examples is empty")
    input_ids_NS = torch.full((len(examples), seq_len), tokenizer.pad_id, dtype=torch.long)
    labels_NS = torch.full_like(input_ids_NS, IGNORE_INDEX)
    task_ids_NS = torch.full_like(input_ids_NS, NO_TASK)
    for row, example in enumerate(examples):
        prompt_ids, answer_ids = encode_example(example, tokenizer)
        tokens = torch.tensor(prompt_ids + answer_ids, dtype=torch.long)
        n = len(tokens) - 1  # positions that get a target
        if n > seq_len:
            raise ValueError(
                f"task {example.task!r} example {example.prompt!r} needs seq_len >= {n} "
                f"(prompt + answer + EOS = {n + 1} tokens); got seq_len={seq_len}"
            )
        input_ids_NS[row, :n] = tokens[:-1]
        labels_NS[row, :n] = tokens[1:]
        if loss_on == "answer":
            # Position s predicts token s + 1; the answer starts at token len(prompt_ids).
            labels_NS[row, : len(prompt_ids) - 1] = IGNORE_INDEX
        task_ids_NS[row, :n] = task_id_fn(example.task)
    return {"input_ids": input_ids_NS, "labels": labels_NS, "task_ids": task_ids_NS}


def _derived_seed(*parts: object) -> int:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # torch seeds must fit in int64


def epoch_permutation(n: int, seed: int, epoch: int, source: str = "") -> torch.Tensor:
    """The row order of one epoch: a permutation seeded by (seed, source, epoch)."""
    generator = torch.Generator().manual_seed(
        _derived_seed("moealign-batches", seed, source, epoch)
    )
    return torch.randperm(n, generator=generator)


def _check_batchable(sequences: Sequences, batch_size: int, source: str) -> int:
    missing = [k for k in SEQUENCE_KEYS if k not in sequences]
    if missing:
        raise ValueError(f"source {source!r} lacks {missing}; sequences need {SEQUENCE_KEYS}")
    n = sequences["input_ids"].shape[0]
    if batch_size < 1 or batch_size > n:
        raise ValueError(
            f"batch_size={batch_size} must lie in [1, {n}] for source {source!r} of {n} rows"
        )
    return n // batch_size


def epoch_batches(
    sequences: Sequences, batch_size: int, seed: int, epoch: int, source: str = ""
) -> Iterator[Sequences]:
    """The full batches of one shuffled epoch (a last partial batch is dropped so every batch
    has shape (batch_size, S))."""
    n_batches = _check_batchable(sequences, batch_size, source)
    order = epoch_permutation(sequences["input_ids"].shape[0], seed, epoch, source)
    for position in range(n_batches):
        rows = order[position * batch_size : (position + 1) * batch_size]
        yield {key: sequences[key][rows] for key in SEQUENCE_KEYS}


def lm_batches(
    blocks_NS1: torch.Tensor, batch_size: int, seed: int, epoch: int
) -> Iterator[Sequences]:
    """One shuffled epoch of text batches from :func:`pack_lm_blocks` output."""
    return epoch_batches(lm_sequences(blocks_NS1), batch_size, seed, epoch, source="text")


def task_batches(
    sequences: Sequences, batch_size: int, seed: int, epoch: int
) -> Iterator[Sequences]:
    """One shuffled epoch of task batches from :func:`task_examples_to_sequences` output."""
    return epoch_batches(sequences, batch_size, seed, epoch, source="tasks")


class BatchStream:
    """An endless, resumable stream of batches interleaving named sources by weight.

    Each source walks through shuffled epochs (:func:`epoch_permutation` of (seed, name,
    epoch)). At step k the stream takes its batch from the source i with the largest deficit
    ``w_i / sum(w) * (k + 1) - taken_i`` (ties: first name in sorted order), so after k steps
    every source has supplied its share of batches up to less than one. The state is
    ``{"seed", "step", "sources": {name: {"epoch", "position"}}}``, a JSON-serialisable dict.
    """

    def __init__(
        self,
        sources: Mapping[str, Sequences],
        batch_size: int,
        seed: int,
        weights: Mapping[str, float] | None = None,
    ) -> None:
        if not sources:
            raise ValueError("sources is empty; give at least one named set of sequences")
        weights = dict(weights) if weights is not None else {name: 1.0 for name in sources}
        if set(weights) != set(sources):
            raise ValueError(
                f"weights names {sorted(weights)} must equal sources names {sorted(sources)}"
            )
        for name, weight in weights.items():
            if not weight > 0:
                raise ValueError(f"weights[{name!r}]={weight} must be positive")
        self.names = sorted(sources)
        self.sources = {name: sources[name] for name in self.names}
        self.batch_size = batch_size
        self.seed = seed
        total = sum(weights.values())
        self.shares = {name: weights[name] / total for name in self.names}
        self.batches_per_epoch = {
            name: _check_batchable(self.sources[name], batch_size, name) for name in self.names
        }
        self.step = 0
        self.epochs = dict.fromkeys(self.names, 0)
        self.positions = dict.fromkeys(self.names, 0)
        self._orders: dict[str, tuple[int, torch.Tensor]] = {}

    def _taken(self, name: str) -> int:
        return self.epochs[name] * self.batches_per_epoch[name] + self.positions[name]

    def _order(self, name: str) -> torch.Tensor:
        epoch = self.epochs[name]
        cached = self._orders.get(name)
        if cached is None or cached[0] != epoch:
            n = self.sources[name]["input_ids"].shape[0]
            cached = (epoch, epoch_permutation(n, self.seed, epoch, name))
            self._orders[name] = cached
        return cached[1]

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Sequences:
        # max() returns the first of equal keys, so ties go to the first name.
        name = max(self.names, key=lambda n: self.shares[n] * (self.step + 1) - self._taken(n))
        position = self.positions[name]
        rows = self._order(name)[position * self.batch_size : (position + 1) * self.batch_size]
        batch = {key: self.sources[name][key][rows] for key in SEQUENCE_KEYS}
        self.step += 1
        if position + 1 == self.batches_per_epoch[name]:
            self.epochs[name] += 1
            self.positions[name] = 0
        else:
            self.positions[name] = position + 1
        return batch

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "step": self.step,
            "sources": {
                name: {"epoch": self.epochs[name], "position": self.positions[name]}
                for name in self.names
            },
        }

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("seed") != self.seed:
            raise ValueError(
                f"state seed={state.get('seed')!r} differs from stream seed={self.seed}"
            )
        sources = state.get("sources", {})
        if sorted(sources) != self.names:
            raise ValueError(
                f"state sources {sorted(sources)} differ from stream sources {self.names}"
            )
        epochs, positions = {}, {}
        for name in self.names:
            epoch, position = int(sources[name]["epoch"]), int(sources[name]["position"])
            if epoch < 0 or not 0 <= position < self.batches_per_epoch[name]:
                raise ValueError(
                    f"state sources[{name!r}] = (epoch={epoch}, position={position}) is out of "
                    f"range: epoch >= 0, 0 <= position < {self.batches_per_epoch[name]}"
                )
            epochs[name], positions[name] = epoch, position
        supplied = sum(epochs[n] * self.batches_per_epoch[n] + positions[n] for n in self.names)
        step = int(state.get("step", -1))
        if step != supplied:
            raise ValueError(
                f"state step={step} differs from the {supplied} batches its sources have supplied"
            )
        self.epochs, self.positions = epochs, positions
        self.step = step


def mixed_batch_stream(
    text_sequences: Sequences,
    task_sequences: Sequences,
    batch_size: int,
    seed: int,
    text_to_task_ratio: float = 1.0,
) -> BatchStream:
    """A stream of text batches and task batches in the ratio ``text_to_task_ratio : 1`` (e.g.
    3.0: three text batches per task batch), so one run sees both."""
    if not text_to_task_ratio > 0:
        raise ValueError(f"text_to_task_ratio={text_to_task_ratio} must be positive")
    return BatchStream(
        {"text": text_sequences, "tasks": task_sequences},
        batch_size,
        seed,
        weights={"text": text_to_task_ratio, "tasks": 1.0},
    )
