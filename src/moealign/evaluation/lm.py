"""Language-model evaluation (DESIGN.md §7): the one evaluation loop of training and
``moealign eval``, token-weighted loss and perplexity over a set of batches with the routing
statistics of every MoE layer (DESIGN.md §4).

The model's call ``model(input_ids_BS)`` returns ``.logits`` (B, S, V) and, for a moealign
model, ``.routing`` (one :class:`~moealign.nn.moe.RoutingInfo` per MoE layer; a model without
routing, e.g. a transformers one, gets the loss only). Shape letters: B rows, S positions,
V vocabulary, L MoE layers, E experts.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moealign.data.batching import IGNORE_INDEX
from moealign.data.tasks import TASK_IDS
from moealign.evaluation.common import autocast, check_positive_int, evaluation_mode, model_device
from moealign.evaluation.metrics import perplexity
from moealign.evaluation.routing_stats import RoutingStats, RoutingSummary, moe_shape

if TYPE_CHECKING:
    from moealign.distributed.context import DistributedContext

__all__ = ["LMEvaluation", "TASK_NAMES", "evaluate_lm"]

# Task names by task id: the rows of the per-task routing statistics (the same on every rank).
TASK_NAMES = sorted(TASK_IDS, key=TASK_IDS.__getitem__)


@dataclass
class LMEvaluation:
    """What :func:`evaluate_lm` measured: ``loss`` = Σ NLL / N over the N labelled tokens
    (nats), ``perplexity`` = exp(loss), ``tokens`` = N, ``batches``, and ``routing`` (None for
    a model without MoE layers): the statistics of the whole set, so ``max_vio`` is
    MaxVio_global (:mod:`moealign.evaluation.routing_stats`)."""

    loss: float
    perplexity: float
    tokens: int
    batches: int
    routing: RoutingSummary | None = None

    def record(self, prefix: str = "val_") -> dict[str, float]:
        """The flat record of ``metrics.jsonl``, ``final_eval.json`` and ``eval.json``:
        ``{prefix}loss``, ``{prefix}ppl``, ``{prefix}tokens`` and ``{prefix}routing/<name>``."""
        record = {
            f"{prefix}loss": self.loss,
            f"{prefix}ppl": self.perplexity,
            f"{prefix}tokens": float(self.tokens),
        }
        if self.routing is not None:
            record |= self.routing.record(f"{prefix}routing/")
        return record


def evaluate_lm(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    max_batches: int | None = None,
    *,
    autocast_dtype: torch.dtype | None = None,
    dist: DistributedContext | None = None,
    sharded: bool = False,
) -> LMEvaluation:
    """Loss, perplexity and routing statistics of ``model`` over ``batches`` (DESIGN.md §7, §4).

    Each batch holds ``input_ids`` and ``labels`` (B, S), labels already shifted, IGNORE_INDEX
    (−100) where no loss is taken, and optionally ``task_ids`` (per-task routing entropy).
    ``max_batches`` stops after that many batches. The forward runs in eval mode without
    autograd under autocast to ``autocast_dtype`` (None = the model's dtype; pass the run's,
    :func:`moealign.evaluation.common.autocast_dtype`, so training and ``moealign eval`` agree);
    the loss is taken on the logits in float32 and summed in float64.

    With ``dist`` (several ranks), each batch's rows are split over the ranks and the sums
    reduced (one collective for the routing statistics, one for the loss); every rank gets the
    result. ``sharded`` (FSDP2 or expert parallelism: the forward is a collective) makes a rank
    without rows join each forward on a stand-in row whose results are discarded.
    """
    if max_batches is not None:
        check_positive_int("max_batches", max_batches)
    device = model_device(model)
    rank, world_size = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    n_layers, n_experts = moe_shape(model)
    routing = (
        RoutingStats(n_layers, n_experts, task_names=TASK_NAMES, device=device)
        if n_layers
        else None
    )
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # Σ NLL, labelled tokens
    n_batches = 0
    with (
        evaluation_mode(model),
        torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
    ):
        for batch in itertools.islice(batches, max_batches):
            missing = [key for key in ("input_ids", "labels") if key not in batch]
            if missing:
                raise ValueError(
                    f"batch {n_batches} lacks {missing}; evaluate_lm needs 'input_ids' and 'labels'"
                )
            n_batches += 1
            mine = torch.arange(batch["input_ids"].shape[0]).tensor_split(world_size)[rank]
            if mine.numel() == 0:
                if sharded:
                    with autocast(device, autocast_dtype):
                        model(batch["input_ids"][:1].to(device))
                continue
            input_ids_BS = batch["input_ids"][mine].to(device)
            labels_BS = batch["labels"][mine].to(device)
            with autocast(device, autocast_dtype):
                output = model(input_ids_BS)
            nll_BS = F.cross_entropy(
                output.logits.float().transpose(1, 2),
                labels_BS,
                ignore_index=IGNORE_INDEX,
                reduction="none",
            )
            totals[0] += nll_BS.double().sum()
            totals[1] += (labels_BS != IGNORE_INDEX).sum()
            if routing is not None:
                task_ids = batch["task_ids"][mine] if "task_ids" in batch else None
                routing.add(output.routing, task_ids)
    if n_batches == 0:
        raise ValueError("batches is empty; evaluate_lm needs at least one batch")
    if dist is not None:
        dist.all_reduce_sum(totals)
        if routing is not None:
            routing.reduce(dist.all_reduce_sum)
    total_nll, n_tokens = float(totals[0]), int(totals[1])
    if n_tokens == 0:
        raise ValueError(
            f"the {n_batches} batches have no labelled token (every label is {IGNORE_INDEX})"
        )
    return LMEvaluation(
        loss=total_nll / n_tokens,
        perplexity=perplexity(total_nll, n_tokens),
        tokens=n_tokens,
        batches=n_batches,
        routing=routing.summary() if routing is not None else None,
    )
