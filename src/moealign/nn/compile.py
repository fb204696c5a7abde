"""``torch.compile`` of each transformer block (``train.compile``), as torchtitan does.

Blocks of one structure share one compiled graph (the parameters are inputs of the graph, not
constants). ``nn.Module.compile`` compiles in place: the blocks stay the same modules with the
same parameter names, so checkpoints, FSDP2 sharding and the code that finds MoE layers see the
uncompiled model. Where the compiler cannot trace (a data-dependent expert
count, a ``torch.compiler.disable``-d kernel) the graph breaks and that part runs eagerly.
"""

from __future__ import annotations

import functools
import logging
import warnings

import torch
from torch import nn

__all__ = ["compile_blocks", "compile_unavailable_reason"]


def compile_blocks(model: nn.Module) -> nn.Module:
    """``block.compile()`` for every block of ``model.blocks`` (in place; returns the model)."""
    for block in model.blocks:
        block.compile()
    return model


@functools.cache
def compile_unavailable_reason(device_type: str) -> str | None:
    """None when ``torch.compile`` (the default inductor backend) works on ``device_type``
    here; else why not, in one line. Compiles and runs a small function, forward and backward:
    this needs a C++ compiler on the CPU and Triton on CUDA."""

    def probe(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(x) * x

    quiet = [logging.getLogger(name) for name in ("torch._dynamo", "torch._inductor")]
    levels = [logger.level for logger in quiet]
    try:
        for logger in quiet:  # a failure is reported once, by the caller
            logger.setLevel(logging.CRITICAL)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            x = torch.linspace(-1, 1, 8, device=device_type, requires_grad=True)
            torch.compile(probe)(x).sum().backward()
        expected = torch.autograd.grad(probe(x).sum(), x)[0]
        if not torch.allclose(x.grad, expected):
            return "a compiled test function gives a wrong gradient"
    except Exception as error:  # any compiler failure: a missing tool, an inductor error
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        return f"{type(error).__name__}: {lines[0][:300] if lines else 'no message'}"
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)
    return None
