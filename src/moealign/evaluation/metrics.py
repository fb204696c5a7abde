"""Evaluation metrics: perplexity, exact match, accuracy, BLEU, ROUGE-L, expert-load MaxVio.

DESIGN.md §7 (metrics) and §4 ("MaxVio"). Text metrics delegate to the reference libraries
(sacrebleu, rouge-score); this module only validates input and aggregates.

Shape letters: L MoE layers, E experts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import sacrebleu
import torch
from rouge_score import rouge_scorer

from moealign.evaluation.diagnostics import max_violation


def perplexity(total_nll: float, n_tokens: int) -> float:
    """Perplexity = exp(total_nll / n_tokens), the exponential of the mean token NLL (nats).

    DESIGN.md §7. Returns ``inf`` when the mean NLL is too large for a float.
    """
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be a positive token count, got {n_tokens}")
    try:
        return math.exp(float(total_nll) / n_tokens)
    except OverflowError:
        return math.inf


def _check_paired(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references must have the same length, got "
            f"{len(predictions)} predictions and {len(references)} references"
        )
    if len(predictions) == 0:
        raise ValueError("predictions and references are empty; at least one example is needed")


def _normalize_whitespace(text: str) -> str:
    return " ".join(text.split())


def exact_match(
    predictions: Sequence[str], references: Sequence[str], normalize: bool = True
) -> float:
    """Fraction of predictions equal to their reference, in [0, 1]. DESIGN.md §7.

    With ``normalize`` both strings are stripped and inner runs of whitespace collapse to one
    space before comparing; case and punctuation are kept.
    """
    _check_paired(predictions, references)
    if normalize:
        predictions = [_normalize_whitespace(p) for p in predictions]
        references = [_normalize_whitespace(r) for r in references]
    return sum(p == r for p, r in zip(predictions, references, strict=True)) / len(predictions)


def _as_numpy(labels: Sequence | np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        return labels.detach().cpu().numpy()
    return np.asarray(labels)


def accuracy(
    predictions: Sequence | np.ndarray | torch.Tensor,
    references: Sequence | np.ndarray | torch.Tensor,
) -> float:
    """Fraction of predicted class labels equal to the reference labels, in [0, 1]. DESIGN.md §7.

    Labels may be a sequence, a NumPy array or a tensor (any device) of ints or strings.
    """
    predictions_N = _as_numpy(predictions).reshape(-1)
    references_N = _as_numpy(references).reshape(-1)
    _check_paired(predictions_N, references_N)
    return float(np.mean(predictions_N == references_N))


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU on the 0–100 scale, one reference per prediction. DESIGN.md §7.

    ``sacrebleu.corpus_bleu`` with its defaults (13a tokenizer, exponential smoothing).
    """
    _check_paired(predictions, references)
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def rouge_l(
    predictions: Sequence[str], references: Sequence[str], use_stemmer: bool = False
) -> float:
    """Mean ROUGE-L F1 over examples, in [0, 1]. DESIGN.md §7.

    Per example: ``rouge_score.rouge_scorer.RougeScorer(["rougeL"]).score(reference,
    prediction).fmeasure`` (LCS-based F1 after rouge-score's lower-casing tokenizer).
    """
    _check_paired(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    scores = [
        scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)
    ]
    return float(np.mean(scores))


class ExpertLoadAccumulator:
    """Accumulates per-layer expert loads over batches and reports MaxVio (DESIGN.md §4).

    ``update(counts_LE)`` takes the number of tokens routed to each expert of each MoE layer in
    one batch. Following Wang et al. 2024 (arXiv 2408.15664):

    * ``max_violation_global()``: MaxVio_l of the counts summed over all updates, mean over l;
    * ``max_violation_batch()``: per update the mean over l of MaxVio_l, then the mean over
      updates.

    Sums are kept in float64 on the device of the first update.
    """

    def __init__(self) -> None:
        self._total_counts_LE: torch.Tensor | None = None
        self._batch_max_violation_sum: torch.Tensor | None = None
        self.n_updates = 0

    def update(self, counts_LE: torch.Tensor) -> None:
        """Add one batch of expert counts, shape (L, E): tokens routed to expert e in layer l."""
        if counts_LE.ndim != 2:
            raise ValueError(
                f"counts_LE must have shape (L, E) = (layers, experts), got shape "
                f"{tuple(counts_LE.shape)}"
            )
        if self._total_counts_LE is not None and counts_LE.shape != self._total_counts_LE.shape:
            raise ValueError(
                f"counts_LE shape {tuple(counts_LE.shape)} differs from earlier updates "
                f"{tuple(self._total_counts_LE.shape)}"
            )
        counts_LE = counts_LE.detach().to(torch.float64)
        if bool((counts_LE < 0).any()) or bool((counts_LE.sum(-1) == 0).any()):
            raise ValueError(
                "counts_LE must be non-negative with at least one routed token per layer, got "
                f"per-layer totals {counts_LE.sum(-1).tolist()} and minimum "
                f"{counts_LE.min().item()}"
            )
        batch_max_violation = max_violation(counts_LE).mean()
        if self._total_counts_LE is None:
            self._total_counts_LE = counts_LE.clone()
            self._batch_max_violation_sum = batch_max_violation
        else:
            self._total_counts_LE += counts_LE.to(self._total_counts_LE.device)
            self._batch_max_violation_sum += batch_max_violation.to(
                self._batch_max_violation_sum.device
            )
        self.n_updates += 1

    @property
    def total_counts_LE(self) -> torch.Tensor:
        """Expert counts summed over all updates, shape (L, E), float64."""
        if self._total_counts_LE is None:
            raise RuntimeError("no expert counts accumulated yet; call update(counts_LE) first")
        return self._total_counts_LE

    def max_violation_global(self) -> float:
        """Mean over layers of MaxVio of the accumulated counts (the whole evaluation set)."""
        return float(max_violation(self.total_counts_LE).mean())

    def max_violation_batch(self) -> float:
        """Mean over updates of the per-batch MaxVio (each already averaged over layers)."""
        if self._batch_max_violation_sum is None:
            raise RuntimeError("no expert counts accumulated yet; call update(counts_LE) first")
        return float(self._batch_max_violation_sum) / self.n_updates
