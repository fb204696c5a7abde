"""Greedy generation (DESIGN.md §7): x_{n+1} = argmax_v logits(x_1..x_n)_v, batched.

Batching relies on causal attention: a row's logits at position s depend only on its tokens
0..s, so rows of different lengths share a right-padded batch. The one exception is a router
with a capacity factor, whose token dropping is decided over the whole batch; there results
depend on the batch composition (as they do in training).

Shape letters: B rows, S positions, V vocabulary, A the rows still generating.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from moealign.evaluation.common import (
    check_positive_int,
    evaluation_mode,
    max_sequence_length,
    model_device,
)


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
        check_positive_int("max_new_tokens", budget)
    check_positive_int("batch_size", batch_size)
    max_length = max_sequence_length(model)
    for index, prompt in enumerate(prompt_ids):
        if len(prompt) == 0:
            raise ValueError(f"prompt_ids[{index}] is empty; generation needs a prompt token")
        if max_length is not None and len(prompt) >= max_length:
            raise ValueError(
                f"prompt_ids[{index}] has {len(prompt)} tokens, leaving no room to generate "
                f"within model.max_seq_len={max_length}"
            )
    device = model_device(model)
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    generated: list[list[int]] = [[] for _ in prompt_ids]
    with evaluation_mode(model):
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
