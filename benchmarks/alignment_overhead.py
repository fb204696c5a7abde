"""Training-time and memory overhead of the routing-alignment term λ·L_align (DESIGN.md §4).

Runs full training steps (forward, backward, clip, optimizer) of one config on its own task
data with the alignment off (``alignment.schedule = "none"``), and on with a fixed λ and the
uniform or the marginal (EMA) prior, everything else identical. Each measurement is a fresh
child process (so that its peak memory is its own: ``torch.cuda.max_memory_allocated`` on
CUDA, the peak resident set size on CPU) that runs ``--warmup`` steps and then ``--steps``
timed steps; the variants' children alternate (none, uniform, marginal, none, ...) for
``--repeats`` rounds so that drifting machine load hits them alike. The table gives the
median tokens/s and peak memory over the rounds and the overhead against "none"
(goal ≤ 2%). Prints the table and writes benchmarks/results/alignment_overhead.json.

    PYTHONPATH=src python3 benchmarks/alignment_overhead.py [--config configs/rma_base.toml]
        [--set model.d_model=256 ...] [--repeats 3 --warmup 3 --steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = Path(__file__).parent / "results" / "alignment_overhead.json"
VARIANTS = {
    "none": ["alignment.schedule=none"],
    "uniform": ["alignment.schedule=fixed", "alignment.prior=uniform"],
    "marginal": ["alignment.schedule=fixed", "alignment.prior=marginal"],
}
COMMON = ["guardrails.policy=off", "train.log_every=1000000", "optim.warmup_steps=0"]


def measure(config_path: str, overrides: list[str], warmup: int, steps: int) -> dict:
    """One child's measurement: median step time over ``steps`` steps, and peak memory."""
    import torch

    from moealign.config import load_config
    from moealign.runs import peak_memory_bytes
    from moealign.train import Trainer

    config = load_config(config_path, overrides)
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = Trainer(config, run_dir=Path(out_dir) / "run", progress=False)
        synchronize = torch.cuda.synchronize if trainer.device.type == "cuda" else lambda: None
        batches = [next(trainer.data.train) for _ in range(warmup + steps)]
        for batch in batches[:warmup]:
            trainer.train_step(batch)
        seconds = []
        for batch in batches[warmup:]:
            synchronize()
            start = time.perf_counter()
            trainer.train_step(batch)
            synchronize()
            seconds.append(time.perf_counter() - start)
        step_s = statistics.median(seconds)
        tokens = batches[0]["input_ids"].numel()
        return {
            "step_ms": 1e3 * step_s,
            "tokens_per_s": tokens / step_s,
            "peak_memory_mib": peak_memory_bytes(trainer.device) / 2**20,
            "device": str(trainer.device),
        }


def run_child(args: argparse.Namespace, variant: str) -> dict:
    overrides = [*args.set, *COMMON, *VARIANTS[variant]]
    command = [sys.executable, __file__, "--child", "--config", args.config]
    command += [f"--set={o}" for o in overrides]
    command += ["--warmup", str(args.warmup), "--steps", str(args.steps)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"variant {variant!r} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "rma_base.toml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for name in ("warmup", "steps", "repeats"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            parser.error(f"--{name}: got {getattr(args, name)}; expected a positive count")
    if args.child:
        print(json.dumps(measure(args.config, args.set, args.warmup, args.steps)))
        return

    rounds: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name in VARIANTS:
            rounds[name].append(run_child(args, name))
    results = {
        name: {
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
            "step_ms": statistics.median(r["step_ms"] for r in runs),
            "peak_memory_mib": statistics.median(r["peak_memory_mib"] for r in runs),
            "rounds": runs,
        }
        for name, runs in rounds.items()
    }
    base = results["none"]
    for result in results.values():
        result["time_overhead_pct"] = 100 * (result["step_ms"] / base["step_ms"] - 1)
        result["memory_overhead_pct"] = 100 * (
            result["peak_memory_mib"] / base["peak_memory_mib"] - 1
        )
    device = base["rounds"][0]["device"]
    print(
        f"device {device}, config {args.config} {' '.join(args.set)}; median of "
        f"{args.repeats} alternating rounds × {args.steps} steps"
    )
    header = f"{'alignment':<10}{'step ms':>10}{'tokens/s':>12}{'time +%':>9}"
    print(header + f"{'peak MiB':>10}{'memory +%':>11}")
    for name, r in results.items():
        print(
            f"{name:<10}{r['step_ms']:>10.2f}{r['tokens_per_s']:>12,.0f}"
            f"{r['time_overhead_pct']:>+9.2f}{r['peak_memory_mib']:>10.1f}"
            f"{r['memory_overhead_pct']:>+11.2f}"
        )
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(
        json.dumps(
            {"device": device, "config": args.config, "args": vars(args), "results": results},
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS_PATH}")


if __name__ == "__main__":
    main()
