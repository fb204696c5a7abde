"""Training-time and memory overhead of the routing-alignment term λ·L_align (DESIGN.md §4).

Runs full training steps (forward, backward, clip, optimizer) of one config on its own task
data with the alignment off (``alignment.schedule = "none"``), and on with a fixed λ and the
uniform or the marginal (EMA) prior, everything else identical (same seed, same batches).

* Time: one child process builds the three trainers and, after ``--warmup`` steps each,
  interleaves them step by step (none, uniform, marginal, none, ...) for ``--steps`` timed
  steps each, so that drifting machine load hits them alike; the step time is the median.
* Memory: a fresh child process per variant and round (so that its peak is its own:
  ``torch.cuda.max_memory_allocated`` on CUDA, the peak resident set size on CPU).

Both are repeated ``--repeats`` times; the table gives medians over the repeats and the
overhead against "none" (goal ≤ 2%). Prints the table and writes
benchmarks/results/alignment_overhead.json.

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
from functools import partial
from pathlib import Path

from common import RESULTS_DIR, wall_seconds, write_results

ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = RESULTS_DIR / "alignment_overhead.json"
VARIANTS = {
    "none": ["alignment.schedule=none"],
    "uniform": ["alignment.schedule=fixed", "alignment.prior=uniform"],
    "marginal": ["alignment.schedule=fixed", "alignment.prior=marginal"],
}
COMMON = ["guardrails.policy=off", "train.log_every=1000000", "optim.warmup_steps=0"]


def _trainer(config_path: str, overrides: list[str], out_dir: str):
    from moealign.config import load_config
    from moealign.training.trainer import Trainer

    config = load_config(config_path, overrides)
    return Trainer(config, run_dir=Path(out_dir) / config.alignment.prior, progress=False)


def measure_time(config_path: str, overrides: list[str], warmup: int, steps: int) -> dict:
    """Median step time per variant, the variants' steps interleaved in one process."""
    with tempfile.TemporaryDirectory() as out_dir:
        trainers = {
            name: _trainer(config_path, [*overrides, *extra], f"{out_dir}/{name}")
            for name, extra in VARIANTS.items()
        }
        device = next(iter(trainers.values())).device
        first = next(iter(trainers.values()))
        batches = [next(first.data.train) for _ in range(warmup + steps)]
        seconds: dict[str, list[float]] = {name: [] for name in trainers}
        for index, batch in enumerate(batches):
            for name, trainer in trainers.items():
                elapsed = wall_seconds(partial(trainer.train_step, batch), device)
                if index >= warmup:
                    seconds[name].append(elapsed)
        tokens = batches[0]["input_ids"].numel()
        return {
            name: {
                "step_ms": 1e3 * statistics.median(s),
                "tokens_per_s": tokens / statistics.median(s),
            }
            for name, s in seconds.items()
        } | {"device": str(device)}


def measure_memory(config_path: str, overrides: list[str], warmup: int, steps: int) -> dict:
    """Peak memory of ``warmup + steps`` training steps of one variant in this process."""
    from moealign.training.runs import peak_memory_bytes

    with tempfile.TemporaryDirectory() as out_dir:
        trainer = _trainer(config_path, overrides, out_dir)
        for _ in range(warmup + steps):
            trainer.train_step(next(trainer.data.train))
        return {"peak_memory_mib": peak_memory_bytes(trainer.device) / 2**20}


def run_child(args: argparse.Namespace, mode: str, variant: str = "none") -> dict:
    overrides = [*args.set, *COMMON, *(VARIANTS[variant] if mode == "memory" else [])]
    command = [sys.executable, __file__, "--child", mode, "--config", args.config]
    command += [f"--set={o}" for o in overrides]
    command += ["--warmup", str(args.warmup), "--steps", str(args.steps)]
    path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path}
    )
    if done.returncode != 0:
        raise RuntimeError(f"{mode} child ({variant}) failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "rma_base.toml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=("time", "memory"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    for name in ("warmup", "steps", "repeats"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            parser.error(f"--{name}: got {getattr(args, name)}; expected a positive count")
    if args.child:
        measure = measure_time if args.child == "time" else measure_memory
        print(json.dumps(measure(args.config, args.set, args.warmup, args.steps)))
        return

    rounds: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        timed = run_child(args, "time")
        for name in VARIANTS:
            memory = run_child(args, "memory", name)
            rounds[name].append({**timed[name], **memory, "device": timed["device"]})
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
        f"{args.repeats} repeats of {args.steps} interleaved steps"
    )
    header = f"{'alignment':<10}{'step ms':>10}{'tokens/s':>12}{'time +%':>9}"
    print(header + f"{'peak MiB':>10}{'memory +%':>11}")
    for name, r in results.items():
        print(
            f"{name:<10}{r['step_ms']:>10.2f}{r['tokens_per_s']:>12,.0f}"
            f"{r['time_overhead_pct']:>+9.2f}{r['peak_memory_mib']:>10.1f}"
            f"{r['memory_overhead_pct']:>+11.2f}"
        )
    write_results(
        RESULTS_PATH,
        {"device": device, "config": args.config, "args": vars(args), "results": results},
    )


if __name__ == "__main__":
    main()
