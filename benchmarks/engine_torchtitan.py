"""Time torchtitan's MoE with its own router and with moealign's MPI router, beside moealign's
own MoELayer at the same shapes (issue 22; combined with the Megatron-Core half into
benchmarks/engines.py).

For T tokens and each expert shape it times one forward+backward (output gradient only, no
auxiliary losses) of

* ``torchtitan``: torchtitan 0.3's ``MoE`` (``TokenChoiceTopKRouter``, softmax scores
  renormalised over the top-K, ``GroupedExperts`` through ``torch._grouped_mm``);
* ``torchtitan_mpi``: the same layer and weights from :func:`moealign.engines.torchtitan.
  mpi_moe_config` (the MPI gate: one power step over ``w1_EFD`` per forward);
* ``moealign`` and ``moealign_mpi``: moealign's ``MoELayer`` (router ``softmax_topk`` /
  ``mpi``) holding the same weights.

Reported: the median seconds of each over ``--repeats`` round-robin rounds (so load from other
processes hits every variant alike) and tokens/s; the MPI overhead of each engine as the
median (and quartiles) of per-round ratios t(MPI)/t(own router) of adjacent runs in
alternating order (goal ≤ 1.01); and the power step's own forward+backward time as a share of
the layer's step with its own router (the only work an MPI router adds: the same computation in
both engines, a few memory passes over the E·F·D gate weights whatever the token count).
torchtitan's experts cast every operand to bf16 whatever the parameters' dtype (its
``GroupedExperts.forward``), so on CPU in fp32 the torchtitan rows run bf16 expert matmuls
and moealign's fp32 ones; on CUDA everything runs bf16.

    PYTHONPATH=src python3 benchmarks/engine_torchtitan.py [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torchtitan
from common import RESULTS_DIR, device_name, wall_seconds, write_results
from moe_layer import seconds_round_robin
from torch import Tensor, nn

from moealign.engines.torchtitan import (
    moe_weights,
    mpi_moe_config,
    softmax_moe_config,
    to_moe_layer,
)

RESULTS_PATH = RESULTS_DIR / "engine_torchtitan.json"
# (experts, top-k, model width, expert width): coarse (Mixtral-like) and fine-grained.
SHAPES = {"coarse": (8, 2, 256, 512), "fine": (32, 8, 256, 128)}
VARIANTS = ("torchtitan", "torchtitan_mpi", "moealign", "moealign_mpi")
OVERHEAD_GOAL = 1.01


def torchtitan_moe(shape: tuple[int, int, int, int], mpi: bool, device, dtype) -> nn.Module:
    n_experts, top_k, d_model, d_ff = shape
    config = softmax_moe_config(
        d_model, d_ff, n_experts, top_k, param_init=partial(nn.init.normal_, std=d_model**-0.5)
    )
    torch.manual_seed(0)
    moe = (mpi_moe_config(config) if mpi else config).build()
    moe.init_states()
    return moe.to(device=device, dtype=dtype)


def training_step(module: nn.Module, x: Tensor, grad_y: Tensor) -> Callable[[], None]:
    """Forward and backward of a layer (moealign's returns (y, routing): y is taken)."""

    def step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        y = module(x)
        y = y[0] if isinstance(y, tuple) else y
        y.backward(grad_y)

    return step


def paired_ratios(
    stock: Callable[[], None], mpi: Callable[[], None], device: torch.device, rounds: int
) -> list[float]:
    """Per round t(mpi)/t(stock) of two adjacent runs, their order alternating between rounds,
    so that load from other processes, which drifts over seconds, hits both alike."""
    ratios = []
    for round_index in range(rounds):
        order = (stock, mpi) if round_index % 2 == 0 else (mpi, stock)
        seconds = {step: wall_seconds(step, device) for step in order}
        ratios.append(seconds[mpi] / seconds[stock])
    return ratios


def power_step(moe: nn.Module) -> Callable[[], None]:
    """The work the MPI gate adds: R_eff = C·retract(AᵀA r) forward and backward."""

    def step() -> None:
        moe.zero_grad(set_to_none=True)
        moe.router.gate.effective_weight().sum().backward()

    return step


def measure(
    tokens: int = 4096,
    shapes: tuple[str, ...] = tuple(SHAPES),
    repeats: int = 5,
    warmup: int = 1,
    device: str | torch.device | None = None,
) -> list[dict]:
    """One row per (shape, variant): median seconds of a forward+backward, tokens/s, and for
    the MPI variants the overhead ratio against the same engine's own router."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for name in shapes:
        shape = SHAPES[name]
        stock = torchtitan_moe(shape, False, device, dtype)
        weights, top_k = moe_weights(stock), shape[1]
        modules = {
            "torchtitan": stock,
            "torchtitan_mpi": torchtitan_moe(shape, True, device, dtype),
            "moealign": to_moe_layer(weights, top_k, "softmax_topk").to(device, dtype),
            "moealign_mpi": to_moe_layer(weights, top_k, "mpi").to(device, dtype),
        }
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(1, tokens, shape[2], generator=generator).to(device, dtype)
        x.requires_grad_()
        grad_y = torch.randn(x.shape, generator=generator).to(device, dtype)
        steps = {v: training_step(m, x, grad_y) for v, m in modules.items()}
        times = seconds_round_robin(steps, device, repeats, warmup)
        seconds = {variant: statistics.median(values) for variant, values in times.items()}
        power = statistics.median(
            wall_seconds(power_step(modules["torchtitan_mpi"]), device) for _ in range(repeats)
        )
        for variant in VARIANTS:
            own = variant.removesuffix("_mpi")
            row = {
                "shape": name,
                "experts_topk_d_model_d_ff": list(shape),
                "variant": variant,
                "seconds": seconds[variant],
                "tokens_per_s": tokens / seconds[variant],
                "mpi_overhead": None,
                "device": device_name(device),
                "dtype": str(dtype).removeprefix("torch."),
            }
            if own != variant:
                ratios = paired_ratios(steps[own], steps[variant], device, repeats)
                quartiles = statistics.quantiles(ratios, n=4)
                row |= {
                    "mpi_overhead": statistics.median(ratios),
                    "mpi_overhead_quartiles": [quartiles[0], quartiles[2]],
                    "power_step_seconds": power,
                    "power_step_share": power / seconds[own],
                }
            rows.append(row)
    return rows


def print_table(rows: list[dict], header: str) -> None:
    print(header)
    columns = f"{'MPI overhead (quartiles)':>26} {'power step share':>17}"
    print(f"{'shape':<8} {'variant':<16} {'seconds':>9} {'tokens/s':>10} {columns}")
    for row in rows:
        overhead = share = ""
        if row["mpi_overhead"] is not None:
            low, high = row["mpi_overhead_quartiles"]
            overhead = f"{row['mpi_overhead']:.3f} ({low:.3f}-{high:.3f})"
            share = f"{row['power_step_share']:.2%}"
        print(
            f"{row['shape']:<8} {row['variant']:<16} {row['seconds']:>9.4f} "
            f"{row['tokens_per_s']:>10.0f} {overhead:>26} {share:>17}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="256 tokens, 3 rounds")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--out", type=Path, default=RESULTS_PATH)
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.repeats = 256, 3
    rows = measure(args.tokens, tuple(args.shapes), args.repeats, args.warmup)
    header = (
        f"MoE forward+backward, T={args.tokens}, {rows[0]['device']}, {rows[0]['dtype']}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"torchtitan {torchtitan.__version__}, median of {args.repeats} (goal: MPI overhead "
        f"<= {OVERHEAD_GOAL})"
    )
    print_table(rows, header)
    write_results(
        args.out,
        {
            "torch": torch.__version__,
            "torchtitan": torchtitan.__version__,
            "threads": torch.get_num_threads(),
            "tokens": args.tokens,
            "repeats": args.repeats,
            "overhead_goal": OVERHEAD_GOAL,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
