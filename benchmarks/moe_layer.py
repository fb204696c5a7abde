"""Time one MoE layer training step against transformers' Mixtral block and a dense ceiling.

For T = 4096 tokens and three expert shapes (coarse, medium, fine-grained) it times the
forward+backward of

* ``MoELayer`` with the ``softmax_topk`` router and with the ``mpi`` router (the step includes
  the load-balance and z-loss terms, as in training);
* transformers' ``MixtralSparseMoeBlock`` with the same weights, under each of its experts
  implementations ("eager", "batched_mm", "grouped_mm"; ``config._experts_implementation``);
* a dense SwiGLU of the same FLOPs: the same three matmuls as if all T·K slots went to one
  expert, (T·K, D)·(D, F) twice and (T·K, F)·(F, D) — the machine's ceiling for this layer;
* the router and auxiliary losses alone (their share of the layer's step).

FLOPs count the expert matmuls only: 3 matmuls × 2·T·K·D·F forward, ×3 for forward+backward.
Runs on CUDA in bf16 when present, else on CPU in fp32. Each variant is warmed up, then the
variants are timed round-robin (so load from other processes hits them alike) and the median
is reported. Prints a table and writes benchmarks/results/moe_layer.json (or ``--out``).

    PYTHONPATH=src python3 benchmarks/moe_layer.py [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from common import RESULTS_DIR, device_name, wall_seconds, write_results
from torch import Tensor, nn
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from moealign.nn import MoELayer, SwiGLU
from moealign.nn.losses import load_balance_loss, z_loss
from moealign.nn.routers import MPIRouter

RESULTS_PATH = RESULTS_DIR / "moe_layer.json"
FLOP_FORMULA = "expert matmuls only: 3 matmuls x 2*T*K*D*F forward, x3 for forward+backward"
TRANSFORMERS_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")
TARGETS = {
    "ceiling_ratio_min": {"coarse": 0.85, "fine": 0.75},
    "transformers_speedup_min": {"coarse": 1.0, "fine": 1.3},
    "mpi_overhead_pct_max": 1.0,
}
# Coefficients of the auxiliary losses in the timed step (their values do not change the cost).
BALANCE_COEFFICIENT, Z_COEFFICIENT = 1e-2, 1e-3


@dataclass(frozen=True)
class Shape:
    n_experts: int
    top_k: int
    d_model: int
    d_ff: int

    def step_flops(self, n_tokens: int) -> int:
        """Forward+backward FLOPs of the expert matmuls: 3 · (3 · 2·T·K·D·F)."""
        return 3 * 3 * 2 * n_tokens * self.top_k * self.d_model * self.d_ff


SHAPES = {
    "coarse": Shape(n_experts=8, top_k=2, d_model=512, d_ff=1024),
    "medium": Shape(n_experts=32, top_k=4, d_model=512, d_ff=256),
    "fine": Shape(n_experts=64, top_k=8, d_model=512, d_ff=128),
}


def mixtral_block_like(layer: MoELayer, implementation: str) -> MixtralSparseMoeBlock:
    """transformers' Mixtral MoE block holding ``layer``'s router and expert weights."""
    experts = layer.experts
    config = MixtralConfig(
        hidden_size=experts.d_model,
        intermediate_size=experts.d_ff,
        num_local_experts=experts.n_experts,
        num_experts_per_tok=layer.top_k,
        router_jitter_noise=0.0,
    )
    config._experts_implementation = implementation
    weight = layer.router.weight
    block = MixtralSparseMoeBlock(config).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        block.gate.weight.copy_(weight)
        block.experts.gate_up_proj.copy_(torch.cat([experts.w_gate, experts.w_up], dim=1))
        block.experts.down_proj.copy_(experts.w_down)
    return block


def batched_mm_bytes(shape: Shape, n_tokens: int, dtype: torch.dtype) -> int:
    """Memory transformers' "batched_mm" gathers: one weight copy per slot, and its gradient."""
    slots = n_tokens * shape.top_k
    per_slot = 3 * shape.d_ff * shape.d_model * torch.finfo(dtype).bits // 8
    return 2 * slots * per_slot


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def moe_step(layer: MoELayer, x: Tensor, grad_y: Tensor) -> Callable[[], None]:
    """One training step of the layer: output, balance and z-loss, backward."""

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        y, info = layer(x)
        aux = BALANCE_COEFFICIENT * info.load_balance_loss + Z_COEFFICIENT * info.z_loss
        torch.autograd.backward([y, aux], [grad_y, torch.ones_like(aux)])

    return step


def router_step(layer: MoELayer, x: Tensor) -> Callable[[], None]:
    """The router and auxiliary losses alone (the part of :func:`moe_step` outside the experts)."""

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        drive = layer.router_drive_matrix() if isinstance(layer.router, MPIRouter) else None
        routed = layer.router(x.reshape(-1, layer.d_model), drive)
        loss = (
            routed.topk_weight.sum()
            + BALANCE_COEFFICIENT
            * load_balance_loss(routed.probs, routed.topk_idx, layer.n_experts)
            + Z_COEFFICIENT * z_loss(routed.logits)
        )
        loss.backward()

    return step


def module_step(module: nn.Module, x: Tensor, grad_y: Tensor) -> Callable[[], None]:
    """Forward and backward of a module returning one tensor (the Mixtral block, dense SwiGLU)."""

    def step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).backward(grad_y)

    return step


def seconds_round_robin(
    steps: dict[str, Callable[[], None]], device: torch.device, repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Wall times of each step over ``repeats`` rounds; every round runs each step once."""

    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(wall_seconds(step, device))
    return times


def check_against_transformers(layer: MoELayer, n_tokens: int) -> float:
    """Max |y_layer − y_mixtral| in float32 on ``n_tokens`` tokens (eager Mixtral experts)."""
    reference = MoELayer(
        layer.d_model, layer.experts.d_ff, layer.n_experts, layer.top_k, router="softmax_topk"
    ).to(layer.router.weight.device)
    reference.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    block = mixtral_block_like(reference, "eager")
    x = torch.randn(1, n_tokens, layer.d_model, device=reference.router.weight.device)
    with torch.no_grad():
        y, _ = reference(x)
        y_block = block(x.clone())
    torch.testing.assert_close(y, y_block, rtol=1e-4, atol=1e-5)
    return float((y - y_block).abs().max())


def bench_shape(
    shape: Shape, n_tokens: int, device: torch.device, dtype: torch.dtype, args
) -> dict:
    torch.manual_seed(0)
    layer = MoELayer(shape.d_model, shape.d_ff, shape.n_experts, shape.top_k, "softmax_topk")
    layer = layer.to(device=device, dtype=dtype)
    mpi_layer = MoELayer(shape.d_model, shape.d_ff, shape.n_experts, shape.top_k, "mpi")
    mpi_layer = mpi_layer.to(device=device, dtype=dtype)
    mpi_layer.load_state_dict(layer.state_dict())  # same router rows and experts
    max_abs_diff = check_against_transformers(layer, n_tokens=256)

    # Three (B, S, D) inputs with one shared upstream gradient; each variant owns its input.
    x = torch.randn(1, n_tokens, shape.d_model, device=device, dtype=dtype)
    grad_y = torch.randn_like(x)

    def fresh() -> Tensor:
        return x.detach().clone().requires_grad_()

    steps = {
        "moe_softmax_topk": moe_step(layer, fresh(), grad_y),
        "moe_mpi": moe_step(mpi_layer, fresh(), grad_y),
    }
    skipped = {}
    for implementation in TRANSFORMERS_IMPLEMENTATIONS:
        needed = batched_mm_bytes(shape, n_tokens, dtype) if implementation == "batched_mm" else 0
        free = free_memory_bytes(device)
        if needed > free // 4:
            skipped[f"transformers_{implementation}"] = (
                f"gathers one weight copy per token slot: ~{needed / 2**30:.1f} GiB with "
                f"gradients, over a quarter of the {free / 2**30:.1f} GiB free"
            )
            continue
        block = mixtral_block_like(layer, implementation)
        steps[f"transformers_{implementation}"] = module_step(block, fresh(), grad_y)
    dense = SwiGLU(shape.d_model, shape.d_ff).to(device=device, dtype=dtype)
    slots = x.reshape(-1, shape.d_model).repeat_interleave(shape.top_k, dim=0)
    steps["dense_ceiling"] = module_step(
        dense, slots.clone().requires_grad_(), torch.randn_like(slots)
    )
    steps["router_and_losses"] = router_step(layer, fresh())
    steps["mpi_router_and_losses"] = router_step(mpi_layer, fresh())

    samples = seconds_round_robin(steps, device, args.repeats, args.warmup)
    seconds = {name: statistics.median(times) for name, times in samples.items()}
    flops = shape.step_flops(n_tokens)
    expert_variants = [name for name in seconds if "router" not in name]
    available = [name for name in seconds if name.startswith("transformers_")]
    best = min(available, key=seconds.get)
    moe = seconds["moe_softmax_topk"]
    return {
        **asdict(shape),
        "step_flops": flops,
        "step_ms": {name: 1e3 * s for name, s in seconds.items()},
        "step_ms_samples": {name: [1e3 * s for s in times] for name, times in samples.items()},
        "tokens_per_s": {name: n_tokens / seconds[name] for name in expert_variants},
        "gflop_per_s": {name: flops / seconds[name] / 1e9 for name in expert_variants},
        "skipped": skipped,
        "transformers_best": best,
        "max_abs_diff_vs_transformers_fp32": max_abs_diff,
        "ratios": {
            "moe_over_ceiling": seconds["dense_ceiling"] / moe,
            "moe_speedup_over_transformers_best": seconds[best] / moe,
            "mpi_overhead_pct": 100 * (seconds["moe_mpi"] - moe) / moe,
            "router_and_losses_share_pct": 100 * seconds["router_and_losses"] / moe,
            "mpi_router_extra_pct": 100
            * (seconds["mpi_router_and_losses"] - seconds["router_and_losses"])
            / moe,
        },
    }


def target_verdicts(results: dict) -> dict:
    verdicts = {}
    for name, minimum in TARGETS["ceiling_ratio_min"].items():
        ratio = results[name]["ratios"]["moe_over_ceiling"]
        verdicts[f"{name}: moe/ceiling >= {minimum}"] = ratio >= minimum
    for name, minimum in TARGETS["transformers_speedup_min"].items():
        ratio = results[name]["ratios"]["moe_speedup_over_transformers_best"]
        verdicts[f"{name}: speedup over transformers >= {minimum}"] = ratio >= minimum
    maximum = TARGETS["mpi_overhead_pct_max"]
    for name, result in results.items():
        overhead = result["ratios"]["mpi_overhead_pct"]
        verdicts[f"{name}: mpi overhead <= {maximum}%"] = overhead <= maximum
    return verdicts


def print_table(results: dict, header: str) -> None:
    print(header)
    print(f"FLOPs: {FLOP_FORMULA}")
    for name, result in results.items():
        shape = (
            f"E={result['n_experts']} K={result['top_k']} D={result['d_model']} F={result['d_ff']}"
        )
        print(f"\n{name} ({shape}), {result['step_flops'] / 1e9:.1f} GFLOP per step")
        print(f"  {'variant':<28}{'step ms':>10}{'tokens/s':>12}{'GFLOP/s':>10}")
        for variant, ms in result["step_ms"].items():
            tokens = result["tokens_per_s"].get(variant)
            gflops = result["gflop_per_s"].get(variant)
            extra = f"{tokens:>12.0f}{gflops:>10.1f}" if tokens is not None else ""
            print(f"  {variant:<28}{ms:>10.1f}{extra}")
        for variant, reason in result["skipped"].items():
            print(f"  {variant:<28}  skipped: {reason}")
        ratios = result["ratios"]
        print(
            f"  moe/ceiling {ratios['moe_over_ceiling']:.2f}, speedup over "
            f"{result['transformers_best']} {ratios['moe_speedup_over_transformers_best']:.2f}x, "
            f"mpi overhead {ratios['mpi_overhead_pct']:+.1f}% "
            f"(router+losses {ratios['router_and_losses_share_pct']:.1f}% of the step, "
            f"mpi router extra {ratios['mpi_router_extra_pct']:+.2f}%)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, help="timed rounds (default 5 on CPU, 20 on CUDA)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="3 rounds (10 on CUDA)")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--out", type=Path, default=RESULTS_PATH)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.repeats is None:
        args.repeats = (
            (10 if args.quick else 20) if device.type == "cuda" else (3 if args.quick else 5)
        )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name_of_device = device_name(device)

    results = {
        name: bench_shape(SHAPES[name], args.tokens, device, dtype, args) for name in args.shapes
    }
    verdicts = target_verdicts(results) if set(args.shapes) == set(SHAPES) else {}
    report = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": name_of_device,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "tokens": args.tokens,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "flop_formula": FLOP_FORMULA,
        "ceiling": "dense SwiGLU on (T*K, D): the same three matmuls, forward+backward",
        "targets": TARGETS,
        "targets_met": verdicts,
        "shapes": results,
    }
    header = (
        f"MoE layer forward+backward, T={args.tokens}, {name_of_device}, {report['dtype']}, "
        f"{report['threads']} threads, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, median of {args.repeats}"
    )
    print_table(results, header)
    for verdict, met in verdicts.items():
        print(f"  [{'met' if met else 'MISSED'}] {verdict}")
    print()
    write_results(args.out, report)


if __name__ == "__main__":
    main()
