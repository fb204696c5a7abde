"""Time one optimizer step on stacked expert tensors, and batched vs per-expert Newton–Schulz.

Shapes (E experts, F expert hidden, D width): three expert tensors w_gate_EFD, w_up_EFD,
w_down_EDF, four D×D attention matrices, an (E, D) router, an embedding and two norm gains.
Prints a table and writes benchmarks/results/optimizer_step.json. Runs on CUDA when present.

    PYTHONPATH=src python3 benchmarks/optimizer_step.py [--experts 32 --hidden 256 --width 512]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from common import RESULTS_DIR, device_name, wall_seconds, write_results
from torch import nn

from moealign.optim.optimizers import OPTIMIZER_NAMES, build_optimizer, newton_schulz_orthogonalize

RESULTS_PATH = RESULTS_DIR / "optimizer_step.json"


class ExpertBlock(nn.Module):
    def __init__(self, experts: int, hidden: int, width: int, vocab: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.norms = nn.ParameterList([nn.Parameter(torch.ones(width)) for _ in range(2)])
        self.attention = nn.ParameterList(
            [nn.Parameter(torch.randn(width, width) / width**0.5) for _ in range(4)]
        )
        self.router = nn.Parameter(torch.randn(experts, width) / width**0.5)
        self.w_gate_EFD = nn.Parameter(torch.randn(experts, hidden, width) / width**0.5)
        self.w_up_EFD = nn.Parameter(torch.randn(experts, hidden, width) / width**0.5)
        self.w_down_EDF = nn.Parameter(torch.randn(experts, width, hidden) / hidden**0.5)


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # warm-up: state allocation, kernel selection
    return statistics.median(wall_seconds(fn, device) for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)

    step_ms = {}
    for name in OPTIMIZER_NAMES:
        model = ExpertBlock(args.experts, args.hidden, args.width, args.vocab).to(device)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        optimizer = build_optimizer(model, name, lr=1e-3)
        step_ms[name] = 1e3 * median_seconds(optimizer.step, device, args.repeats)

    update_EFD = torch.randn(args.experts, args.hidden, args.width, device=device)
    batched_ms = 1e3 * median_seconds(
        lambda: newton_schulz_orthogonalize(update_EFD), device, args.repeats
    )
    loop_ms = 1e3 * median_seconds(
        lambda: [newton_schulz_orthogonalize(update_FD) for update_FD in update_EFD],
        device,
        args.repeats,
    )

    print(
        f"device {device}, E={args.experts} F={args.hidden} D={args.width}, median of "
        f"{args.repeats}"
    )
    print(f"{'optimizer':<12}{'step ms':>10}")
    for name, ms in step_ms.items():
        print(f"{name:<12}{ms:>10.2f}")
    print(
        f"Newton–Schulz on ({args.experts}, {args.hidden}, {args.width}): batched "
        f"{batched_ms:.2f} ms, per-expert loop {loop_ms:.2f} ms, loop/batched "
        f"{loop_ms / batched_ms:.2f}x"
    )

    result = {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "shape": {
            "experts": args.experts,
            "hidden": args.hidden,
            "width": args.width,
            "vocab": args.vocab,
        },
        "repeats": args.repeats,
        "step_ms": step_ms,
        "newton_schulz_ms": {"batched": batched_ms, "per_expert_loop": loop_ms},
        "loop_over_batched": loop_ms / batched_ms,
    }
    write_results(RESULTS_PATH, result)


if __name__ == "__main__":
    main()
