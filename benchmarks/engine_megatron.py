"""Megatron-Core's ``MoELayer`` with its own router and with moealign's MPI router, beside
moealign's ``MoELayer``, at the same shapes (issue 22).

For T tokens ([S, B] = [T/8, 8]) it times the forward+backward (output gradient plus the
balance and z-losses, which Megatron attaches through its aux-loss autoscaler) of

* Megatron's ``MoELayer`` (``SequentialMLP`` experts, ``allgather`` dispatcher) with its
  ``TopKRouter`` and with :func:`moealign.engines.megatron.mpi_router` (the overhead ratio
  MPI / TopKRouter, the median of the per-round ratios; goal ≤ 1.01);
* moealign's ``MoELayer`` with the ``softmax_topk`` and ``mpi`` routers (its default experts);
* the MPI router's extra work alone (R_eff from the experts, forward+backward), whose share of
  the TopKRouter step is the overhead apart from the noise of whole steps.

Runs on CUDA in bf16 when present (Megatron routes in fp32: ``moe_router_dtype="fp32"``),
else on the CPU in fp32. Megatron 0.16.1's ``TopKRouter.gating`` moves its weight to
``torch.cuda.current_device()`` and reads ``te_general_gemm``, undefined without Transformer
Engine: on the CPU the first is pointed at the CPU and the second set to the None its import
fallback means, so the stock router runs unmodified. Each variant is warmed up, then the
variants are timed round-robin and the median (with min and max) is reported.
``measure(...)`` returns the rows; run as a script it prints a table and writes
benchmarks/results/engine_megatron.json (or ``--out``).

    PYTHONPATH=src python3 benchmarks/engine_megatron.py [--tokens 4096 --repeats 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from common import RESULTS_DIR, device_name, run_record, write_results
from megatron.core import parallel_state
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.moe_layer import MoELayer as MegatronMoELayer
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_config import TransformerConfig
from moe_layer import BALANCE_COEFFICIENT, Z_COEFFICIENT, moe_step, seconds_round_robin
from torch import Tensor

from moealign.distributed.context import free_port
from moealign.engines.megatron import bind_experts, mpi_router
from moealign.nn import MoELayer

RESULTS_PATH = RESULTS_DIR / "engine_megatron.json"
OVERHEAD_GOAL = 1.01
ROWS_ONLY = "mpi_router R_eff alone (fwd+bwd)"


def megatron_layer(
    args: argparse.Namespace, router, dtype: torch.dtype, device
) -> MegatronMoELayer:
    config = TransformerConfig(
        num_layers=1,
        hidden_size=args.d_model,
        num_attention_heads=4,
        ffn_hidden_size=args.d_ff,
        moe_ffn_hidden_size=args.d_ff,
        num_moe_experts=args.experts,
        moe_router_topk=args.top_k,
        moe_router_dtype="fp32",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        moe_token_dispatcher_type="allgather",
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=BALANCE_COEFFICIENT,
        moe_z_loss_coeff=Z_COEFFICIENT,
        use_cpu_initialization=True,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
    )
    spec = get_moe_module_spec(use_te=False, num_experts=args.experts)
    spec.submodules.router = router
    layer = MegatronMoELayer(config, spec.submodules, layer_number=1)
    layer.set_layer_number(1)
    layer.to(device)
    bind_experts(layer)
    return layer


def megatron_step(layer: MegatronMoELayer, x: Tensor, grad_y: Tensor) -> Callable[[], None]:
    """Output and the aux losses Megatron attached (its autoscaler), backward."""

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        y, _ = layer(x)
        y.backward(grad_y)

    return step


def rows_step(layer: MegatronMoELayer) -> Callable[[], None]:
    """The MPI router's extra work alone: R_eff from the experts, forward and backward."""

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        layer.router.effective_weight().sum().backward()

    return step


def measure(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> list[dict[str, float | str]]:
    """One row per variant: every round's seconds per step, their median, min and max, and
    tokens/s (median); the last row times R_eff's forward+backward alone (no tokens)."""
    torch.manual_seed(0)
    n_tokens = args.tokens
    x = torch.randn(n_tokens // 8, 8, args.d_model, device=device, dtype=dtype)
    x.requires_grad_(True)
    grad_y = torch.randn_like(x)
    stock = megatron_layer(args, TopKRouter, dtype, device)
    mpi = megatron_layer(args, mpi_router(), dtype, device)
    steps = {
        "megatron MoELayer, TopKRouter": megatron_step(stock, x, grad_y),
        "megatron MoELayer, mpi_router": megatron_step(mpi, x, grad_y),
    }
    for router in ("softmax_topk", "mpi"):
        layer = MoELayer(args.d_model, args.d_ff, args.experts, args.top_k, router=router)
        layer.to(device=device, dtype=dtype)
        layer.router.float()  # moealign keeps router parameters in fp32
        steps[f"moealign MoELayer, {router}"] = moe_step(
            layer,
            x.detach().reshape(-1, args.d_model).requires_grad_(True),
            grad_y.view(-1, args.d_model),
        )
    steps[ROWS_ONLY] = rows_step(mpi)
    times = seconds_round_robin(steps, device, args.repeats, args.warmup)
    rows = []
    for name, seconds in times.items():
        median = statistics.median(seconds)
        rows.append(
            {
                "variant": name,
                "seconds_median": median,
                "seconds_min": min(seconds),
                "seconds_max": max(seconds),
                "tokens_per_s": None if name == ROWS_ONLY else n_tokens / median,
                "seconds": seconds,
            }
        )
    return rows


def overhead_ratio(rows: list[dict]) -> float:
    """Step time of Megatron's layer with the MPI router over that with TopKRouter: the median
    over rounds of each round's ratio (the two ran back to back, so load from other processes
    hits both alike)."""
    seconds = {row["variant"]: row["seconds"] for row in rows}
    pairs = zip(
        seconds["megatron MoELayer, mpi_router"],
        seconds["megatron MoELayer, TopKRouter"],
        strict=True,
    )
    return statistics.median(mpi / stock for mpi, stock in pairs)


def rows_share(rows: list[dict]) -> float:
    """R_eff's forward+backward over the step with TopKRouter (medians): the overhead the MPI
    router's extra work implies, measured apart from the noise of whole steps."""
    seconds = {row["variant"]: row["seconds_median"] for row in rows}
    return seconds[ROWS_ONLY] / seconds["megatron MoELayer, TopKRouter"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-ff", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS_PATH)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if not cuda:
        torch.cuda.current_device = lambda: torch.device("cpu")
    if moe_utils.__dict__.get("te_general_gemm", None) is None:
        moe_utils.te_general_gemm = None
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    rows = measure(args, device, dtype)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    ratio = overhead_ratio(rows)
    print(
        f"{device_name(device)}, {dtype}, {torch.get_num_threads()} threads; T={args.tokens} "
        f"D={args.d_model} F={args.d_ff} E={args.experts} K={args.top_k}"
    )
    print(f"{'variant':34} {'ms/step (median)':>17} {'min-max':>15} {'tokens/s':>10}")
    for row in rows:
        spread = f"{row['seconds_min'] * 1e3:.1f}-{row['seconds_max'] * 1e3:.1f}"
        rate = "-" if row["tokens_per_s"] is None else f"{row['tokens_per_s']:.0f}"
        print(f"{row['variant']:34} {row['seconds_median'] * 1e3:17.1f} {spread:>15} {rate:>10}")
    share = rows_share(rows)
    verdict = "meets" if ratio <= OVERHEAD_GOAL else "misses"
    print(
        f"MPI overhead in Megatron's layer: x{ratio:.3f} (median of paired rounds; {verdict} "
        f"the goal x{OVERHEAD_GOAL}); R_eff alone: {share:.1%} of the TopKRouter step"
    )
    results = {
        "dtype": str(dtype),
        "rows": rows,
        "mpi_overhead_ratio": ratio,
        "mpi_rows_share": share,
    }
    write_results(args.out, run_record(str(device), args, results | {"goal": OVERHEAD_GOAL}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
