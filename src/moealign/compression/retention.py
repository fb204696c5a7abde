"""Retention of a compressed model: compressed / original on every evaluation metric.

Metrics (each ``None`` where the source does not have it): validation loss ``val_loss`` (mean
token NLL) and ``val_perplexity``; task-suite accuracy on the seen tasks' test split
(``task_accuracy_seen``) and on the held-out tasks (``task_accuracy_heldout``); parameter counts
``params_total`` and ``params_active`` (per token: K of E experts); and inference
``tokens_per_s`` (forward passes over the validation batches without gradients; the original
and the compressed model take turns, and the fastest of ``repeats`` passes counts).

Retention r = compressed / original for each metric (None when either is missing or the
original is 0). For loss and perplexity r > 1 is a loss of quality; for accuracy r < 1 is.

Over several seeds a ratio is summarised on the log scale (:func:`ratio_interval`): the
geometric mean exp(mean log r) with the Student-t interval of mean log r exponentiated back,
exp(mean log r ± t_{(1+c)/2, n−1} · s_log / √n), which stays positive and is symmetric in
"× k" and "÷ k" (a t interval on r itself can reach below 0, e.g. perplexity × 3.6 ± 6.9).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from moealign.evaluation.common import evaluation_mode, model_device
from moealign.evaluation.stats import mean_confidence_interval
from moealign.tables import Table, format_number

METRICS = (
    ("val_loss", "val loss"),
    ("val_perplexity", "val perplexity"),
    ("task_accuracy_seen", "task accuracy (seen)"),
    ("task_accuracy_heldout", "task accuracy (held out)"),
    ("params_total", "parameters (total)"),
    ("params_active", "parameters (active)"),
    ("tokens_per_s", "inference tokens/s"),
)


def inference_tokens_per_s(
    models: Sequence[nn.Module], batches: Sequence[Mapping[str, Tensor]], repeats: int = 3
) -> list[float]:
    """Tokens per second of each model's forward passes over ``batches`` without gradients:
    after one warm-up pass each, the models take turns for ``repeats`` timed passes (so that
    a shared machine's load falls on all alike), and each model's fastest pass counts."""
    best = [float("inf")] * len(models)
    n_tokens = sum(batch["input_ids"].numel() for batch in batches)
    for repeat in range(repeats + 1):
        for index, model in enumerate(models):
            device = model_device(model)
            inputs = [batch["input_ids"].to(device) for batch in batches]
            synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda device: None
            with evaluation_mode(model):
                synchronize(device)
                start = time.perf_counter()
                for ids in inputs:
                    model(ids)
                synchronize(device)
            if repeat > 0:  # the first round warms up
                best[index] = min(best[index], time.perf_counter() - start)
    return [n_tokens / seconds for seconds in best]


def lm_metrics(evaluation: Mapping[str, Any]) -> dict[str, Any]:
    """Loss, perplexity and task accuracies from an evaluation record
    (:func:`moealign.evaluation.run.evaluation_record`; None for what it lacks)."""
    return {
        "val_loss": evaluation.get("val_loss"),
        "val_perplexity": evaluation.get("val_ppl"),
        "task_accuracy_seen": evaluation.get("task_accuracy_seen"),
        "task_accuracy_heldout": evaluation.get("task_accuracy_heldout"),
    }


def retention(original: Mapping[str, Any], compressed: Mapping[str, Any]) -> dict[str, Any]:
    """compressed / original per metric of :data:`METRICS` (None where undefined)."""
    ratios = {}
    for key, _ in METRICS:
        before, after = original.get(key), compressed.get(key)
        ratios[key] = None if before in (None, 0) or after is None else after / before
    return ratios


def ratio_interval(ratios: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(geometric mean, low, high) of positive ratios over seeds: the t interval of the mean
    log ratio, exponentiated (module docstring); low = high = nan for a single ratio."""
    ratios_N = np.asarray(ratios, dtype=np.float64)
    if ratios_N.ndim != 1 or ratios_N.size == 0 or not np.all(ratios_N > 0):
        raise ValueError(f"ratios must be a non-empty sequence of positive numbers, got {ratios}")
    logs_N = np.log(ratios_N)
    mean, half_width, _ = mean_confidence_interval(logs_N, confidence)
    return math.exp(mean), math.exp(mean - half_width), math.exp(mean + half_width)


def ratio_text(ratios: Sequence[float | None]) -> str:
    """``0.987 [0.951, 1.024]``: :func:`ratio_interval` of the positive ratios at 3 significant
    digits (the geometric mean alone for one, ``–`` for none; ``(n=k)`` when some are missing
    or not positive)."""
    present = [r for r in ratios if r is not None and math.isfinite(r) and r > 0]
    if not present:
        return "–"
    mean, low, high = ratio_interval(present)
    text = format_number(mean, 3)
    if math.isfinite(low):
        text += f" [{format_number(low, 3)}, {format_number(high, 3)}]"
    return text + (f" (n={len(present)})" if len(present) != len(ratios) else "")


def retention_table(report: Mapping[str, Any]) -> Table:
    """Rows (metric, original, compressed, compressed/original) of a report holding
    ``original``, ``compressed`` and ``retention`` metric dicts (numbers at 4 significant
    digits, :func:`moealign.tables.format_number`; ``–`` where missing)."""
    rows = [
        [
            label,
            format_number(report["original"].get(key)),
            format_number(report["compressed"].get(key)),
            format_number(report["retention"].get(key)),
        ]
        for key, label in METRICS
    ]
    return Table(["metric", "original", "compressed", "compressed/original"], rows)
