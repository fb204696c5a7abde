"""What every evaluation function shares: the model's device and sequence limit, eval mode
without autograd (the training mode restored afterwards), and argument checks."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

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
