"""Calibration (and held-out) batches for ``moealign compress``.

Batches are dicts of ``input_ids`` (B, S) and ``attention_mask`` (B, S; 1 = a real token),
holding exactly the requested number of real tokens (fewer only when the data runs out).

* From a run's training stream (the default for a moealign run): the stream's first batches,
  padding (the tokenizer's PAD id) masked out.
* From a text file (``.txt``, or ``.jsonl`` with a ``text`` field): each document tokenised,
  cut into windows of ``seq_len`` tokens, right-padded into batches; the first N tokens
  calibrate, the following ones (a Hugging Face model's held-out perplexity) get next-token
  labels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from moealign.data.batching import IGNORE_INDEX
from moealign.integrations.analyze import load_texts, token_batches

Batch = dict[str, Tensor]


def _trim_to(batch: Batch, mask_BS: Tensor, n_tokens: int) -> Batch:
    """``batch`` with ``attention_mask`` = ``mask_BS`` restricted to its first ``n_tokens`` real
    tokens (row-major order)."""
    within = mask_BS.reshape(-1).cumsum(0).view_as(mask_BS) <= n_tokens
    return {"input_ids": batch["input_ids"], "attention_mask": (mask_BS & within).long()}


def stream_batches(stream: Iterator[Batch], pad_id: int, n_tokens: int) -> list[Batch]:
    """The next batches of a training stream up to ``n_tokens`` real (non-PAD) tokens."""
    batches, remaining = [], n_tokens
    while remaining > 0:
        batch = next(stream)
        mask_BS = batch["input_ids"] != pad_id
        batches.append(_trim_to(batch, mask_BS, remaining))
        remaining -= int(batches[-1]["attention_mask"].sum())
    return batches


def split_tokens(
    token_ids: list[list[int]], n_first: int
) -> tuple[list[list[int]], list[list[int]]]:
    """(the first ``n_first`` tokens, the rest) of documents' token ids, document by document."""
    first, rest, budget = [], [], n_first
    for ids in token_ids:
        taken = list(ids[:budget])
        budget -= len(taken)
        if taken:
            first.append(taken)
        if len(ids) > len(taken):
            rest.append(list(ids[len(taken) :]))
    return first, rest


def with_next_token_labels(batch: Batch) -> Batch:
    """``labels`` (B, S): the next real token at each position, IGNORE_INDEX where there is none
    (padding, a window's last position)."""
    input_ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = torch.where(mask[:, 1:], input_ids[:, 1:], IGNORE_INDEX)
    return {**batch, "labels": labels}


def text_batches(
    path: str | Path,
    encode: Callable[[str], list[int]],
    seq_len: int,
    batch_size: int,
    n_calibration: int,
    n_held_out: int = 0,
) -> tuple[list[Batch], list[Batch]]:
    """(calibration batches of the file's first ``n_calibration`` tokens, held-out batches with
    labels of up to ``n_held_out`` following tokens). ValueError if the file is unreadable or
    holds no tokens."""
    token_ids = [encode(text) for text in load_texts(path)]
    first, rest = split_tokens(token_ids, n_calibration)
    calibration = list(token_batches(first, seq_len, batch_size, n_calibration))
    held_out = []
    if n_held_out > 0 and any(rest):
        held_out = [
            with_next_token_labels(batch)
            for batch in token_batches(rest, seq_len, batch_size, n_held_out)
        ]
    return calibration, held_out
