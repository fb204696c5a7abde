"""Activation checkpointing of transformer blocks (``train.activation_checkpointing``).

Modes: ``none`` (every activation the backward pass needs is kept), ``full`` (each block keeps
only its input; its forward is run again in the backward pass, torchtitan's "full" AC) and
``moe`` (only each MoE FFN sub-module is recomputed: the expert hidden states, the largest
activations of a MoE block, are not kept; attention's are). Both use
``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` with the RNG state preserved, so the
recomputed forward draws the same jitter and logit-dropout noise and routes every token to the
same experts. The mode is a per-block attribute read inside :class:`~moealign.nn.transformer.
Block` (no wrapper module): parameter and state-dict names stay unchanged, and FSDP2, which
shards each block, runs the recomputation with the block's parameters already gathered for its
backward pass.

What the recomputation must not repeat: the blocks' outputs of the second run are discarded,
so the loss terms read from :class:`~moealign.nn.moe.RoutingInfo` (balance, z-loss, alignment)
and the routing statistics are counted once; the one side effect of a forward, the router's
expert counts for the aux-loss-free bias update (:class:`~moealign.nn.routers.Router`), is
skipped while :func:`is_recomputing` (set by the checkpoint's recomputation context, which
also holds in compiled blocks: ``train.compile`` with checkpointing counts once too).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "ACTIVATION_CHECKPOINTING",
    "apply_activation_checkpointing",
    "checkpointed",
    "is_recomputing",
]

ACTIVATION_CHECKPOINTING = ("none", "full", "moe")

_recomputing = False


def is_recomputing() -> bool:
    """True while a checkpointed forward runs again in the backward pass."""
    return _recomputing


@contextlib.contextmanager
def _recomputation() -> Iterator[None]:
    global _recomputing
    previous, _recomputing = _recomputing, True
    try:
        yield
    finally:
        _recomputing = previous


def _contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    return contextlib.nullcontext(), _recomputation()


def checkpointed(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, its activations recomputed in the backward pass instead of kept; a plain
    call where no graph is recorded (evaluation, ``torch.no_grad``)."""
    if not torch.is_grad_enabled():
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False, context_fn=_contexts)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> nn.Module:
    """Set ``mode`` (one of :data:`ACTIVATION_CHECKPOINTING`) on every block of ``model.blocks``
    (in place; returns the model)."""
    if mode not in ACTIVATION_CHECKPOINTING:
        raise ValueError(
            f"activation_checkpointing={mode!r} is not accepted; "
            f"choose one of {ACTIVATION_CHECKPOINTING}"
        )
    for block in model.blocks:
        block.activation_checkpointing = mode
    return model
