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
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from train_step import random_data

from moealign.config import load_config
from moealign.optim import OPTIMIZER_NAMES
from moealign.train import Trainer

RESULTS_PATH = Path(__file__).parent / "results" / "optimizer_share.json"
ROUTERS = ("softmax_topk", "mpi")


def time_optimizer_share(config, args, out_dir: str) -> dict[str, float]:
    """Median full-step and optimizer-step milliseconds of ``config`` and their ratio."""
    data = random_data(config.model.vocab_size, args.batch, args.seq_len, rows=4 * args.batch)
    trainer = Trainer(config, data=data, run_dir=Path(out_dir) / config.name, progress=False)
    synchronize = torch.cuda.synchronize if trainer.device.type == "cuda" else lambda: None
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
    for _ in range(args.warmup):
        trainer.train_step(next(data.train))
    step_seconds, share_seconds = [], []
    for _ in range(args.repeats):
        optimizer_seconds.clear()
        synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            trainer.train_step(next(data.train))
        synchronize()
        step_seconds.append((time.perf_counter() - start) / args.steps)
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
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--expert-d-ff", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    base = load_config(
        None,
        [
            f"model.d_model={args.d_model}",
            f"model.n_layers={args.layers}",
            f"model.n_heads={args.heads}",
            f"model.n_experts={args.experts}",
            f"model.top_k={args.top_k}",
            f"model.expert_d_ff={args.expert_d_ff}",
            f"model.vocab_size={args.vocab}",
            f"model.max_seq_len={args.seq_len}",
            f"train.seq_len={args.seq_len}",
            f"train.batch_size={args.batch}",
            "optim.warmup_steps=0",
        ],
    )
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
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(
        json.dumps(
            {
                "device": device,
                "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
                "torch": torch.__version__,
                "args": vars(args),
                "results": results,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS_PATH}")


if __name__ == "__main__":
    main()
