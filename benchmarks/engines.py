"""Both engine benchmarks in one command (issue 22): Megatron-Core's ``MoELayer`` and
torchtitan's ``MoE``, each with its own router and with moealign's MPI router, beside
moealign's ``MoELayer`` at the same shapes.

Each engine runs in its own process (Megatron's needs a process group and, on a CPU, stands in
for ``torch.cuda.current_device``; torchtitan's does neither), through
``engine_megatron.py`` and ``engine_torchtitan.py``, which print their tables and write
``results/engine_megatron.json`` and ``results/engine_torchtitan.json``. This script then
prints the MPI overhead of each engine side by side (goal ≤ 1.01) and writes
``results/engines.json``. fp32 on a CPU, bf16 on CUDA.

    PYTHONPATH=src python3 benchmarks/engines.py [--tokens 4096] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import RESULTS_DIR, write_results

HERE = Path(__file__).resolve().parent
RESULTS_PATH = RESULTS_DIR / "engines.json"


def run_engine(script: str, out: Path, tokens: int, repeats: int) -> dict:
    """Run one engine's benchmark script and return the JSON it wrote."""
    argv = [sys.executable, str(HERE / script), "--tokens", str(tokens)]
    argv += ["--repeats", str(repeats), "--out", str(out)]
    subprocess.run(argv, check=True)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS_PATH)
    args = parser.parse_args(argv)
    megatron = run_engine(
        "engine_megatron.py", RESULTS_DIR / "engine_megatron.json", args.tokens, args.repeats
    )
    torchtitan = run_engine(
        "engine_torchtitan.py", RESULTS_DIR / "engine_torchtitan.json", args.tokens, args.repeats
    )
    summary = {
        "tokens": args.tokens,
        "repeats": args.repeats,
        "megatron_mpi_overhead": megatron["results"]["mpi_overhead_ratio"],
        "megatron_power_step_share": megatron["results"]["mpi_rows_share"],
        "torchtitan_rows": torchtitan["rows"],
    }
    print(
        f"\nMegatron-Core: MPI overhead x{summary['megatron_mpi_overhead']:.3f}, power step "
        f"{summary['megatron_power_step_share']:.1%} of the step"
    )
    for row in torchtitan["rows"]:
        if row["mpi_overhead"] is not None:
            print(
                f"{row['variant'].removesuffix('_mpi')} in torchtitan's {row['shape']} shape: "
                f"x{row['mpi_overhead']:.3f}, power step {row['power_step_share']:.1%} of the step"
            )
    write_results(args.out, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
