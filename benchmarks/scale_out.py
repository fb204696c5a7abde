"""Communication volume and step time of DDP, FSDP2 and expert parallelism vs one process.

At a fixed global batch, one process runs the whole batch and ``--world`` ranks (spawned here,
gloo on CPU, nccl when there are as many GPUs) run it as DDP, FSDP2, expert parallelism over all
ranks (``ep``, ep = world) and the same code with the experts replicated (``ep1``: a (world, 1)
mesh, i.e. data parallel through the EP code path). For each it reports

* the bytes each rank hands to collectives in one training step, by collective, counted by a
  ``TorchDispatchMode`` that sees every c10d op (DDP's bucketed all-reduce, FSDP2's
  all-gather/reduce-scatter, the all-to-all dispatch forward and backward, the metric
  reductions): the payload a rank passes in, not the wire traffic of the algorithm;
* the median step time and its ratio to the one-process step. On the CPU every process
  (the single one and each rank) uses ``--threads`` intra-op threads (1 by default), so the
  ratio shows what each added rank (core) buys.

    PYTHONPATH=src python3 benchmarks/scale_out.py [--world 2] [--steps 3] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import (
    RESULTS_DIR,
    model_overrides,
    run_record,
    wall_seconds,
    write_results,
)
from torch.utils._python_dispatch import TorchDispatchMode
from train_step import random_data

from moealign.config import load_config
from moealign.distributed.context import free_port, set_local_rank_environment
from moealign.training.trainer import Trainer

RESULTS_PATH = RESULTS_DIR / "scale_out.json"
# Which argument of each c10d op holds the payload a rank sends (ops writing into an output
# buffer take it first); bookkeeping ops (wait_tensor, ...) carry none.
PAYLOAD_ARGUMENT = {
    "allreduce_": 0,
    "broadcast_": 0,
    "allgather_": 1,
    "_allgather_base_": 1,
    "_reduce_scatter_base_": 1,
    "reduce_scatter_": 1,
    "alltoall_base_": 1,
    "all_to_all_single": 0,
    "all_gather_into_tensor": 0,
    "reduce_scatter_tensor": 0,
    "all_reduce": 0,
}
VARIANTS = {"ddp": ("ddp", 1), "fsdp": ("fsdp", 1), "ep": ("ep", None), "ep1": ("ep", 1)}


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


class CommunicationCounter(TorchDispatchMode):
    """Bytes passed to each kind of c10d collective while active."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace, name = func.namespace, func._opname
        if namespace in ("c10d", "_c10d_functional") and name in PAYLOAD_ARGUMENT:
            self.bytes[name] += _nbytes(args[PAYLOAD_ARGUMENT[name]])
        return func(*args, **(kwargs or {}))


def _config(args, name: str, parallel: str, ep_size: int, grad_accum: int):
    shape = argparse.Namespace(
        d_model=args.d_model,
        layers=2,
        heads=4,
        experts=args.experts,
        top_k=2,
        expert_d_ff=args.d_model,
        vocab=args.vocab,
        seq_len=args.seq_len,
        batch=args.batch,
    )
    return load_config(
        None,
        [
            *model_overrides(shape),
            f"model.router={args.router}",
            f"train.grad_accum={grad_accum}",
            f"train.parallel={parallel}",
            f"train.ep_size={ep_size}",
            f"name={name}",
        ],
    )


def measure(args, name: str, parallel: str, ep_size: int, out_dir: str) -> dict:
    """Counted bytes of one step, then the median time of ``args.steps`` steps."""
    config = _config(args, name, parallel, ep_size, grad_accum=1)
    data = random_data(config.model.vocab_size, args.batch, args.seq_len, rows=4 * args.batch)
    trainer = Trainer(config, data=data, run_dir=Path(out_dir) / name, progress=False)
    trainer.train_step(next(data.train))  # warm-up
    counter = CommunicationCounter()
    with counter:
        trainer.train_step(next(data.train))
    seconds = []
    for _ in range(args.steps):
        if trainer.dist.enabled:
            dist.barrier()
        seconds.append(wall_seconds(lambda: trainer.train_step(next(data.train)), trainer.device))
    return {
        "step_ms": 1e3 * statistics.median(seconds),
        "bytes_per_rank": dict(counter.bytes),
        "total_bytes_per_rank": sum(counter.bytes.values()),
        "device": str(trainer.device),
    }


def _rank_main(rank: int, world: int, port: int, args, out_dir: str) -> None:
    set_local_rank_environment(rank, world, port)
    torch.set_num_threads(args.threads)
    results = {}
    for name, (parallel, ep_size) in VARIANTS.items():
        results[name] = measure(args, name, parallel, ep_size or world, out_dir)
    if rank == 0:
        Path(out_dir, "ranks.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--router", default="softmax_topk")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    parser.add_argument("--out", type=Path, default=RESULTS_PATH)
    args = parser.parse_args()
    if torch.cuda.is_available() and torch.cuda.device_count() < args.world:
        raise SystemExit(
            f"--world {args.world} needs {args.world} GPUs with nccl; this machine has "
            f"{torch.cuda.device_count()}: run with CUDA_VISIBLE_DEVICES= for the CPU (gloo) run"
        )
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as out_dir:
        single = measure(args, "single", "ddp", 1, out_dir)
        mp.spawn(_rank_main, args=(args.world, free_port(), args, out_dir), nprocs=args.world)
        results = {"single": single, **json.loads(Path(out_dir, "ranks.json").read_text())}
    for result in results.values():
        result["step_time_ratio"] = result["step_ms"] / single["step_ms"]

    print(
        f"device {single['device']}, world {args.world}, router {args.router}, "
        f"d_model={args.d_model} E={args.experts} K=2, global batch {args.batch}x{args.seq_len}, "
        f"{args.threads} thread(s) per process, median of {args.steps} steps"
    )
    print(f"{'variant':<8}{'MB/rank/step':>14}{'step ms':>10}{'vs 1':>7}  by collective (MB)")
    for name, r in results.items():
        detail = ", ".join(f"{op} {b / 1e6:.2f}" for op, b in sorted(r["bytes_per_rank"].items()))
        print(
            f"{name:<8}{r['total_bytes_per_rank'] / 1e6:>14.2f}{r['step_ms']:>10.1f}"
            f"{r['step_time_ratio']:>7.2f}  {detail}"
        )
    write_results(args.out, run_record(single["device"], args, results))


if __name__ == "__main__":
    main()
