"""Tokens/s of a full training step (forward, backward, clip, optimizer, bias update).

Compares a MoE model with softmax top-k routing, the same model with the MPI router, and the
dense model of matched *active* parameters (``ModelConfig.dense_matched()``). Each variant
runs ``--warmup`` steps, then ``--repeats`` timings of ``--steps`` steps; the table reports the
median. Prints a table and writes benchmarks/results/train_step.json. Runs on CUDA when present
(bf16 autocast there, as the Trainer does by default).

    PYTHONPATH=src python3 benchmarks/train_step.py [--d-model 512 --layers 8 --experts 16]
"""

from __future__ import annotations

import argparse
import dataclasses
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

    for _ in range(args.warmup):
        trainer.train_step(next(data.train))
    seconds = [wall_seconds(run_steps, trainer.device) / args.steps for _ in range(args.repeats)]
    step_s = statistics.median(seconds)
    counts = trainer.model.parameter_counts()
    return {
        "step_ms": 1e3 * step_s,
        "tokens_per_s": args.batch * args.seq_len / step_s,
        "params_total": counts["total"],
        "params_active": counts["active"],
        "device": str(trainer.device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--optimizer", default="adamw")
    add_timing_arguments(parser)
    args = parser.parse_args()

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
    with tempfile.TemporaryDirectory() as out_dir:
        results = {name: time_variant(config, args, out_dir) for name, config in variants.items()}

    device = next(iter(results.values()))["device"]
    print(
        f"device {device}, d_model={args.d_model} layers={args.layers} E={args.experts} "
        f"K={args.top_k} batch={args.batch}x{args.seq_len}, median of {args.repeats}"
    )
    print(f"{'variant':<18}{'active':>12}{'total':>12}{'step ms':>10}{'tokens/s':>12}")
    for name, r in results.items():
        print(
            f"{name:<18}{r['params_active']:>12,}{r['params_total']:>12,}"
            f"{r['step_ms']:>10.1f}{r['tokens_per_s']:>12,.0f}"
        )
    write_results(RESULTS_PATH, run_record(device, args, results))


if __name__ == "__main__":
    main()
