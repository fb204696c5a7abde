"""Peak memory and step time of a training step under each ``train.activation_checkpointing``.

For ``none``, ``full`` and ``moe`` (:mod:`moealign.nn.checkpointing`) the same MoE model takes
``--warmup`` training steps (so the optimizer state exists), then one measured step, then
``--repeats`` timings of ``--steps`` steps (median). Peak memory is the most tensor memory the
step holds at once above what was allocated before it (parameters, optimizer state):

* on CUDA, ``torch.cuda.max_memory_allocated`` minus ``torch.cuda.memory_allocated`` before;
* on the CPU (where torch has no allocator statistics), a ``TorchDispatchMode`` sees every
  tensor that an operator allocates during the step (outputs of non-view, non-in-place ops)
  and a finaliser on its storage sees it freed: the peak of the live bytes. Scratch memory
  inside a kernel is not seen; everything the autograd graph keeps, the recomputation makes
  and the gradients are.

Prints a table and writes benchmarks/results/activation_checkpointing.json.

    PYTHONPATH=src python3 benchmarks/activation_checkpointing.py [--layers 8 --seq-len 256]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import weakref
from pathlib import Path

import torch
from common import (
    RESULTS_DIR,
    add_model_arguments,
    add_timing_arguments,
    model_overrides,
    run_record,
    wall_seconds,
    write_results,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from train_step import random_data

from moealign.config import load_config
from moealign.nn.checkpointing import ACTIVATION_CHECKPOINTING
from moealign.training.trainer import Trainer

RESULTS_PATH = RESULTS_DIR / "activation_checkpointing.json"
CPU_METHOD = "TorchDispatchMode: peak live bytes of tensors allocated by operators in the step"
CUDA_METHOD = "torch.cuda.max_memory_allocated minus memory_allocated before the step"


class AllocatedTensorBytes(TorchDispatchMode):
    """Live bytes of the storages that operators allocate while the mode is active (``live``)
    and their maximum (``peak``); each storage is counted once, until it is freed."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._counted: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not (func.is_view or func._schema.is_mutable):  # a view or in-place result is old
            for tensor in tree_leaves(out):
                if isinstance(tensor, torch.Tensor):
                    self._count(tensor.untyped_storage())
        return out

    def _count(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata
        if key in self._counted:
            return
        self._counted.add(key)
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, storage.nbytes())

    def _free(self, key: int, nbytes: int) -> None:
        self._counted.discard(key)
        self.live -= nbytes


def peak_step_bytes(trainer: Trainer, batch) -> int:
    """The peak tensor memory of one training step above what it starts with (docstring)."""
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(trainer.device)
        torch.cuda.reset_peak_memory_stats(trainer.device)
        trainer.train_step(batch)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(trainer.device) - before
    with AllocatedTensorBytes() as counter:
        trainer.train_step(batch)
    return counter.peak


def measure(config, args, out_dir: str) -> dict[str, float]:
    data = random_data(config.model.vocab_size, args.batch, args.seq_len, rows=4 * args.batch)
    trainer = Trainer(config, data=data, run_dir=Path(out_dir) / config.name, progress=False)
    for _ in range(args.warmup):
        trainer.train_step(next(data.train))
    peak = peak_step_bytes(trainer, next(data.train))

    def run_steps() -> None:
        for _ in range(args.steps):
            trainer.train_step(next(data.train))

    seconds = [wall_seconds(run_steps, trainer.device) / args.steps for _ in range(args.repeats)]
    return {
        "peak_mib": peak / 2**20,
        "step_ms": 1e3 * statistics.median(seconds),
        "step_ms_runs": [1e3 * second for second in seconds],
        "device": str(trainer.device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    add_timing_arguments(parser)
    args = parser.parse_args()

    base = load_config(None, model_overrides(args))
    results = {}
    with tempfile.TemporaryDirectory() as out_dir:
        for mode in ACTIVATION_CHECKPOINTING:
            train = dataclasses.replace(base.train, activation_checkpointing=mode)
            config = dataclasses.replace(base, name=f"ac_{mode}", train=train)
            results[mode] = measure(config, args, out_dir)
    for result in results.values():
        result["saved_vs_none"] = 1 - result["peak_mib"] / results["none"]["peak_mib"]
        result["time_vs_none"] = result["step_ms"] / results["none"]["step_ms"]

    device = results["none"]["device"]
    method = CUDA_METHOD if device.startswith("cuda") else CPU_METHOD
    print(
        f"device {device}, d_model={args.d_model} layers={args.layers} E={args.experts} "
        f"K={args.top_k} batch={args.batch}x{args.seq_len}, median of {args.repeats}\n"
        f"peak memory: {method}"
    )
    print(f"{'mode':<8}{'peak MiB':>10}{'saved':>8}{'step ms':>10}{'min-max ms':>14}{'time ×':>8}")
    for mode, r in results.items():
        print(
            f"{mode:<8}{r['peak_mib']:>10.1f}{r['saved_vs_none']:>8.1%}{r['step_ms']:>10.1f}"
            f"{min(r['step_ms_runs']):>7.0f}-{max(r['step_ms_runs']):<6.0f}"
            f"{r['time_vs_none']:>8.2f}"
        )
    record = run_record(device, args, results)
    record["peak_memory_method"] = method
    write_results(RESULTS_PATH, record)


if __name__ == "__main__":
    main()
