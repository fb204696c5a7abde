"""The optimizer step's share of a full training step, per optimizer (DESIGN.md §6).

For each optimizer name (adamw, muon, adamh, muonh) and router (softmax top-k, MPI), a Trainer
runs ``--warmup`` steps, then ``--repeats`` timings of ``--steps`` steps on random tokens. The
full step (forward, backward, clip, optimizer, bias update) is timed around
``Trainer.train_step``; the optimizer step alone by step pre/post hooks on the optimizer
(``torch.optim.Optimizer.register_step_pre_hook``), with a device synchronisation on CUDA. The
table reports medians and the share optimizer / full step. Muon's and MuonH's Newton–Schulz
runs batched over the experts of each stacked (E, out, in) tensor (``moealign.optim``).
Prints a table and writes benchmarks/results/optimizer_share.json. Runs on CUDA when present.

    PYTHONPATH=src python3 benchmarks/optimizer_share.py [--d-model 512 --experts 16]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

from common import (
    RESULTS_DIR,
    add_model_arguments,
    add_timing_arguments,
    model_overrides,
    run_record,
    synchronizer,
    wall_seconds,
    write_results,
)
from train_step import random_data

from moealign.config import load_config
from moealign.optim.optimizers import OPTIMIZER_NAMES
from moealign.training.trainer import Trainer

RESULTS_PATH = RESULTS_DIR / "optimizer_share.json"
ROUTERS = ("softmax_topk", "mpi")


def time_optimizer_share(config, args, out_dir: str) -> dict[str, float]:
    """Median full-step and optimizer-step milliseconds of ``config`` and their ratio."""
    data = random_data(config.model.vocab_size, args.batch, args.seq_len, rows=4 * args.batch)
    trainer = Trainer(config, data=data, run_dir=Path(out_dir) / config.name, progress=False)
    synchronize = synchronizer(trainer.device)
    optimizer_seconds: list[float] = []
    started: list[float] = []

    def before(optimizer, args, kwargs) -> None:
        synchronize()
        started.append(time.perf_counter())

    def after(optimizer, args, kwargs) -> None:
        synchronize()
        optimizer_seconds.append(time.perf_counter() - started.pop())

    trainer.optimizer.register_step_pre_hook(before)
    trainer.optimizer.register_step_post_hook(after)

    def run_steps() -> None:
        for _ in range(args.steps):
            trainer.train_step(next(data.train))

    for _ in range(args.warmup):
        trainer.train_step(next(data.train))
    step_seconds, share_seconds = [], []
    for _ in range(args.repeats):
        optimizer_seconds.clear()
        step_seconds.append(wall_seconds(run_steps, trainer.device) / args.steps)
        share_seconds.append(sum(optimizer_seconds) / args.steps)
    step_s, optimizer_s = statistics.median(step_seconds), statistics.median(share_seconds)
    return {
        "step_ms": 1e3 * step_s,
        "optimizer_ms": 1e3 * optimizer_s,
        "optimizer_share": optimizer_s / step_s,
        "device": str(trainer.device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    add_timing_arguments(parser)
    args = parser.parse_args()

    base = load_config(None, model_overrides(args))
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as out_dir:
        for name in OPTIMIZER_NAMES:
            for router in ROUTERS:
                config = dataclasses.replace(
                    base,
                    name=f"{name}_{router}",
                    optim=dataclasses.replace(base.optim, name=name),
                    model=dataclasses.replace(base.model, router=router),
                )
                results.setdefault(name, {})[router] = time_optimizer_share(config, args, out_dir)

    device = results[OPTIMIZER_NAMES[0]][ROUTERS[0]]["device"]
    print(
        f"device {device}, d_model={args.d_model} layers={args.layers} E={args.experts} "
        f"F={args.expert_d_ff} K={args.top_k} batch={args.batch}x{args.seq_len}, median of "
        f"{args.repeats}"
    )
    print(f"{'optimizer':<10}{'router':<14}{'step ms':>10}{'optim ms':>10}{'share':>8}")
    for name, per_router in results.items():
        for router, r in per_router.items():
            print(
                f"{name:<10}{router:<14}{r['step_ms']:>10.1f}{r['optimizer_ms']:>10.1f}"
                f"{r['optimizer_share']:>8.1%}"
            )
    write_results(RESULTS_PATH, run_record(device, args, results))


if __name__ == "__main__":
    main()
