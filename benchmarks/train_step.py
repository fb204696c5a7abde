"""Tokens/s of a full training step (forward, backward, clip, optimizer, bias update).

Compares a MoE model with softmax top-k routing, the same model with the MPI router, and the
dense model of matched *active* parameters (``ModelConfig.dense_matched()``). Each variant
runs ``--warmup`` steps, then ``--repeats`` timings of ``--steps`` steps; the table reports the
median. Prints a table and writes benchmarks/results/train_step.json. Runs on CUDA when present
(bf16 autocast there, as the Trainer does by default).

``--compile`` times each variant a second time with ``train.compile = true`` (every block
``torch.compile``-d), side by side: the ratio of the compiled median step time to the eager
one, and the compile time, reported apart: the first compiled step minus the median step, with
the inductor cache emptied first (a fresh ``TORCHINDUCTOR_CACHE_DIR``; the compiled variants
after the first may reuse kernels it compiled). On a CPU shared with other work, run it with
``OMP_NUM_THREADS=1``: inductor's OpenMP kernels wait for busy cores far longer than eager
ATen does, which measures the contention, not the compiler.

    PYTHONPATH=src python3 benchmarks/train_step.py [--d-model 512 --layers 8 --experts 16]
    PYTHONPATH=src python3 benchmarks/train_step.py --compile
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
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

from moealign.config import load_config
from moealign.data import BatchStream, ByteTokenizer
from moealign.data.build import TrainingData
from moealign.training.trainer import Trainer

RESULTS_PATH = RESULTS_DIR / "train_step.json"


def random_data(vocab: int, batch: int, seq_len: int, rows: int) -> TrainingData:
    generator = torch.Generator().manual_seed(0)
    tokens_NS1 = torch.randint(0, vocab, (rows, seq_len + 1), generator=generator)
    sequences = {
        "input_ids": tokens_NS1[:, :-1].contiguous(),
        "labels": tokens_NS1[:, 1:].contiguous(),
        "task_ids": torch.full((rows, seq_len), -1),
    }
    stream = BatchStream({"random": sequences}, batch, seed=0)
    return TrainingData(train=stream, validation=[next(stream)], tokenizer=ByteTokenizer())


def time_variant(config, args, out_dir: str) -> dict[str, float]:
    data = random_data(config.model.vocab_size, args.batch, args.seq_len, rows=4 * args.batch)
    trainer = Trainer(config, data=data, run_dir=Path(out_dir) / config.name, progress=False)

    def run_steps() -> None:
        for _ in range(args.steps):
            trainer.train_step(next(data.train))

    first_s = wall_seconds(lambda: trainer.train_step(next(data.train)), trainer.device)
    for _ in range(args.warmup - 1):
        trainer.train_step(next(data.train))
    seconds = [wall_seconds(run_steps, trainer.device) / args.steps for _ in range(args.repeats)]
    step_s = statistics.median(seconds)
    counts = trainer.model.parameter_counts()
    return {
        "step_ms": 1e3 * step_s,
        "step_ms_runs": [1e3 * second for second in seconds],
        "first_step_ms": 1e3 * first_s,
        "tokens_per_s": args.batch * args.seq_len / step_s,
        "params_total": counts["total"],
        "params_active": counts["active"],
        "device": str(trainer.device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--compile", action="store_true", help="also time train.compile=true")
    add_timing_arguments(parser)
    args = parser.parse_args()
    if args.compile and args.warmup < 2:
        parser.error("--compile needs --warmup >= 2 (the first step compiles)")

    base = load_config(None, [*model_overrides(args), f"optim.name={args.optimizer}"])
    variants = {
        "moe_softmax_topk": dataclasses.replace(base, name="moe_softmax_topk"),
        "moe_mpi": dataclasses.replace(
            base, name="moe_mpi", model=dataclasses.replace(base.model, router="mpi")
        ),
        "dense_matched": dataclasses.replace(
            base, name="dense_matched", model=base.model.dense_matched()
        ),
    }
    if args.compile:
        variants |= {f"{name}+compile": compiled(config) for name, config in variants.items()}
    with tempfile.TemporaryDirectory() as out_dir:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(out_dir) / "inductor")
        results = {name: time_variant(config, args, out_dir) for name, config in variants.items()}
    for name, r in results.items():
        eager = results.get(name.removesuffix("+compile"))
        if name.endswith("+compile") and eager is not None:
            r["compiled_vs_eager"] = r["step_ms"] / eager["step_ms"]
            r["compile_s"] = (r["first_step_ms"] - r["step_ms"]) / 1e3

    device = next(iter(results.values()))["device"]
    print(
        f"device {device}, d_model={args.d_model} layers={args.layers} E={args.experts} "
        f"K={args.top_k} batch={args.batch}x{args.seq_len}, median of {args.repeats}"
    )
    print(
        f"{'variant':<26}{'active':>12}{'total':>12}{'step ms':>10}{'min-max ms':>14}"
        f"{'tokens/s':>10}{'vs eager':>10}{'compile s':>11}"
    )
    for name, r in results.items():
        compiled_columns = (
            f"{r['compiled_vs_eager']:>10.2f}{r['compile_s']:>11.1f}" if "compile_s" in r else ""
        )
        print(
            f"{name:<26}{r['params_active']:>12,}{r['params_total']:>12,}{r['step_ms']:>10.1f}"
            f"{min(r['step_ms_runs']):>7.0f}-{max(r['step_ms_runs']):<6.0f}"
            f"{r['tokens_per_s']:>10,.0f}{compiled_columns}"
        )
    write_results(RESULTS_PATH, run_record(device, args, results))


def compiled(config):
    """``config`` with ``train.compile = true``, under its own run name."""
    train = dataclasses.replace(config.train, compile=True)
    return dataclasses.replace(config, name=f"{config.name}_compiled", train=train)


if __name__ == "__main__":
    main()
