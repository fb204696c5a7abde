"""Human-readable names and units of the metric keys runs log, for table headers and figures.

Keys are those of ``metrics.jsonl``, ``final_eval.json`` and
:func:`moealign.studies.results.run_results` (DESIGN.md §8). Prefixes compose:
``val_routing/<q>`` is ``routing/<q>`` on the validation set, ``train_mean/<key>`` the mean of
``<key>`` over the logged training steps, ``routing/layer{l}/<q>`` one layer's value and
``task_accuracy/<seen|heldout>/<task|mean>`` an accuracy. A key with no name here is shown
with its separators spelled out, so any metric still gets a label. Reports keep the raw key
beside the label (an HTML tooltip), since ``--metrics`` takes raw keys.
"""

from __future__ import annotations

import re

__all__ = ["metric_group", "metric_label", "metric_name", "metric_unit"]

# key: (name, unit)
_NAMES = {
    "loss": ("training loss", "nats/token"),
    "lm_loss": ("training LM loss", "nats/token"),
    "val_loss": ("validation loss", "nats/token"),
    "val_ppl": ("validation perplexity", ""),
    "lr": ("learning rate", ""),
    "lambda": ("alignment weight λ(t)", ""),
    "align_kl": ("alignment KL", "nats"),
    "grad_norm": ("gradient norm", ""),
    "balance_loss": ("balance loss", ""),
    "z_loss": ("router z-loss", ""),
    "tokens_per_s": ("throughput", "tokens/s"),
    "tokens_seen": ("tokens seen", ""),
    "peak_memory_mib": ("peak memory", "MiB"),
    "train_time_s": ("training time", "s"),
    "wall_time_s": ("wall time", "s"),
    "params_total": ("parameters, total", ""),
    "params_active": ("parameters, active", ""),
    "routing/max_vio": ("MaxVio, batch", ""),
    "routing/max_vio_batch": ("MaxVio, mean over (micro-)batches", ""),
    "routing/balance_loss": ("balance loss", ""),
    "routing/z_loss": ("router z-loss", ""),
    "routing/token_entropy": ("token routing entropy", "H / log E"),
    "routing/usage_entropy": ("expert-usage entropy", "H / log E"),
    "routing/task_entropy": ("per-task routing entropy", "H / log E"),
    "routing/dead_experts": ("dead experts", "per layer"),
    "routing/projection_alignment": ("projection alignment λ", ""),
    "routing/projection_alignment_raw": ("projection alignment λ of the raw rows R", ""),
    "routing/router_grad_norm": ("router gradient norm", ""),
}
_ACCURACY_SPLITS = {"seen": "seen-task", "heldout": "held-out-task"}
_LAYER = re.compile(r"^routing/layer(\d+)/(.+)$")


def _lookup(key: str) -> tuple[str, str]:
    if key in _NAMES:
        return _NAMES[key]
    if key.startswith(("step0/", "change_from_step0/")):
        kind, rest = key.split("/", 1)
        name, unit = _lookup(rest)
        return f"{name}, {'at step 0' if kind == 'step0' else 'change from step 0'}", unit
    if key == "val_routing/max_vio":
        return "validation MaxVio, global", _NAMES["routing/max_vio"][1]
    if key.startswith("val_routing/"):
        name, unit = _lookup("routing/" + key.removeprefix("val_routing/"))
        return f"validation {name}", unit
    if key.startswith("train_mean/"):
        name, unit = _lookup(key.removeprefix("train_mean/"))
        return f"{name} (training mean)", unit
    if key.startswith("task_accuracy/") and key.count("/") == 2:
        _, split, task = key.split("/")
        split_name = _ACCURACY_SPLITS.get(split, split)
        return (f"{split_name} accuracy" if task == "mean" else f"{task} ({split_name})"), "0–1"
    if key.startswith("routing/task_entropy/"):
        name, unit = _NAMES["routing/task_entropy"]
        return f"{name}: {key.removeprefix('routing/task_entropy/')}", unit
    layer = _LAYER.match(key)
    if layer:
        name, unit = _lookup("routing/" + layer.group(2))
        return f"{name}, layer {layer.group(1)}", unit
    return key.replace("_", " ").replace("/", " / "), ""


def metric_name(key: str) -> str:
    """``val_routing/max_vio`` → ``validation MaxVio, global``."""
    return _lookup(key)[0]


def metric_unit(key: str) -> str:
    """``val_loss`` → ``nats/token``; empty where the quantity has no unit."""
    return _lookup(key)[1]


def metric_label(key: str) -> str:
    """The name with its unit in brackets: ``validation loss (nats/token)``."""
    name, unit = _lookup(key)
    return f"{name} ({unit})" if unit else name


_GROUPS = (  # (group, key fragments), first match wins
    ("task accuracy", ("accuracy", "exact_match", "bleu", "rouge", "ctgi")),
    ("routing", ("routing", "max_vio", "balance_loss", "z_loss", "entropy", "dead_experts")),
    ("efficiency", ("tokens_per_s", "memory", "time_s", "params")),
    ("language modelling", ("loss", "ppl")),
)


def metric_group(key: str) -> str:
    """The kind of quantity ``key`` is, for grouping table columns: ``language modelling``,
    ``routing``, ``task accuracy``, ``efficiency`` or ``other``."""
    return next((group for group, parts in _GROUPS if any(part in key for part in parts)), "other")
