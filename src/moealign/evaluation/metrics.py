"""Evaluation metrics: perplexity, exact match, accuracy, BLEU, ROUGE-L (DESIGN.md §7).

Text metrics delegate to the reference libraries (sacrebleu, rouge-score); this module only
validates input and aggregates. Routing statistics (MaxVio, entropies, ...) are
:mod:`moealign.evaluation.routing_stats`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import sacrebleu
import torch
from rouge_score import rouge_scorer


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
