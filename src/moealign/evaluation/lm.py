"""Language-model evaluation (DESIGN.md §7): token-weighted loss and perplexity over a set of
batches, with the routing statistics of every MoE layer (DESIGN.md §4).

The model's call ``model(input_ids_BS)`` returns ``.logits`` (B, S, V) and, for a moealign
model, ``.routing`` (one :class:`~moealign.nn.moe.RoutingInfo` per MoE layer; a transformers
model's output has none, and gets the loss only). Shape letters: B rows, S positions,
V vocabulary, L MoE layers, E experts, T tokens.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moealign.data.batching import IGNORE_INDEX
from moealign.evaluation import diagnostics
from moealign.evaluation.common import check_positive_int, evaluation_mode, model_device
from moealign.evaluation.metrics import ExpertLoadAccumulator, perplexity
from moealign.nn.moe import RoutingInfo


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
        check_positive_int("max_batches", max_batches)
    device = model_device(model)
    total_nll = torch.zeros((), dtype=torch.float64, device=device)
    n_tokens = torch.zeros((), dtype=torch.long, device=device)
    n_batches = 0
    routing_totals: _RoutingTotals | None = None
    with evaluation_mode(model):
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
            if getattr(output, "routing", None):  # a transformers model has none
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
