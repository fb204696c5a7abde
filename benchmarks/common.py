"""Pieces the benchmark scripts share: the model-shape arguments and overrides, synchronised
wall-clock timing and the JSON result record.

The scripts run as ``python3 benchmarks/X.py``, which puts this folder on ``sys.path``, so they
import these as ``from common import ...``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).parent / "results"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and batch shape options of the training-step benchmarks."""
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--expert-d-ff", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)


def add_timing_arguments(parser: argparse.ArgumentParser) -> None:
    """``--warmup`` steps, then ``--repeats`` timings of ``--steps`` steps each."""
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)


def model_overrides(args: argparse.Namespace) -> list[str]:
    """``load_config`` overrides of the model shape in ``args`` (d_model, layers, heads,
    experts, top_k, expert_d_ff, vocab), trained on (batch, seq_len) batches with no
    learning-rate warm-up."""
    return [
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
    ]


def synchronizer(device: torch.device) -> Callable[[], None]:
    """Waits for the device's queued work: ``torch.cuda.synchronize`` on CUDA, else nothing."""
    return torch.cuda.synchronize if device.type == "cuda" else lambda: None


def wall_seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of ``fn()``, the device synchronised before and after."""
    synchronize = synchronizer(device)
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def device_name(device: str | torch.device) -> str:
    """The GPU's name on a CUDA device, else ``"cpu"``."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def run_record(device: str, args: argparse.Namespace, results: dict) -> dict[str, Any]:
    """The result file's content: device, its name, torch version, intra-op threads, the
    arguments and results."""
    return {
        "device": device,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "results": results,
    }


def write_results(path: Path, record: dict) -> None:
    """Writes ``record`` as indented JSON to ``path`` (creating its folder) and says so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
