"""What every evaluation function shares: the model's device and sequence limit, eval mode
without autograd (the training mode restored afterwards), argument checks, the run's compute
precision (autocast) and strict-JSON records."""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model with neither."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def max_sequence_length(model: nn.Module) -> int | None:
    """``model.config.max_seq_len`` where the model has one (:class:`MoETransformer`)."""
    return getattr(getattr(model, "config", None), "max_seq_len", None)


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the duration; the previous training mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def check_positive_int(name: str, value: object) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ValueError(f"{name}={value!r} is not accepted; expected an integer >= 1")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.precision`` on ``device``: None for ``fp32``, bfloat16 for
    ``bf16``, and for ``auto`` bfloat16 on a CUDA device that supports it (else None). Training
    and every evaluation of a run resolve it alike, so they compute in the same precision."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"precision={precision!r} is not accepted; expected auto, fp32 or bf16")
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if cuda_bf16 else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``'s type; no change when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def strict_json(record: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` with every non-finite float (at any depth) replaced by None, and the keys of
    the top-level entries that held one listed under ``"nonfinite"``, so that the record is
    strict JSON (no ``NaN``/``Infinity``) and a reader can still tell a null from a divergence."""
    flagged: list[str] = []

    def clean(value: Any) -> tuple[Any, bool]:
        if isinstance(value, float) and not math.isfinite(value):
            return None, True
        if isinstance(value, Mapping):
            items = {k: clean(v) for k, v in value.items()}
            return {k: v for k, (v, _) in items.items()}, any(bad for _, bad in items.values())
        if isinstance(value, (list, tuple)):
            items = [clean(v) for v in value]
            return [v for v, _ in items], any(bad for _, bad in items)
        return value, False

    out: dict[str, Any] = {}
    for key, value in record.items():
        out[key], bad = clean(value)
        if bad:
            flagged.append(key)
    if flagged:
        out["nonfinite"] = sorted(set(flagged) | set(record.get("nonfinite") or []))
    return out
