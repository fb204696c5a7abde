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
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from moealign.config import load_config
from moealign.data import BatchStream, ByteTokenizer
from moealign.train import Trainer
from moealign.training_data import TrainingData

RESULTS_PATH = Path(__file__).parent / "results" / "train_step.json"


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
    synchronize = torch.cuda.synchronize if trainer.device.type == "cuda" else lambda: None
    for _ in range(args.warmup):
        trainer.train_step(next(data.train))
    seconds = []
    for _ in range(args.repeats):
        synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            trainer.train_step(next(data.train))
        synchronize()
        seconds.append((time.perf_counter() - start) / args.steps)
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
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--expert-d-ff", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--optimizer", default="adamw")
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
            f"optim.name={args.optimizer}",
            "optim.warmup_steps=0",
        ],
    )
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
