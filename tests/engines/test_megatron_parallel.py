"""Expert parallelism with the MPI router in Megatron-Core (issue 22): 2 gloo ranks, each with
its own tokens and the ``allgather`` dispatcher, equal one process running both ranks' tokens —
with expert parallelism (EP = 2: each rank holds 2 of the 4 experts) and with expert tensor
parallelism (expert TP = 2: each rank holds half of every expert's F rows)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

pytest.importorskip("megatron.core")

from helpers_megatron import (  # noqa: E402
    D_FF,
    D_MODEL,
    N_EXPERTS,
    megatron_moe_layer,
    megatron_parallel,
    tiny_config,
)
from moealign.distributed.context import free_port, set_local_rank_environment  # noqa: E402
from moealign.engines.megatron import RoutingRecorder, mpi_router  # noqa: E402

OPTIONS = {"power_steps": 2}
WORLD = 2
MODES = ("ep", "etp")


def _inputs() -> torch.Tensor:
    return torch.randn(WORLD, 5, 2, D_MODEL, generator=torch.Generator().manual_seed(7))


def _local_state(full: dict[str, Tensor], rank: int, mode: str) -> dict[str, Tensor]:
    """The full layer's state as rank ``rank`` holds it: ``ep``, its experts (renumbered);
    ``etp``, every expert's F rows ``rank·F/2 … (rank+1)·F/2 − 1`` of the gate and of the up
    half of linear_fc1 (Megatron's GLU splits the local fc1 output in halves) and the matching
    columns of linear_fc2."""
    state = {"router.weight": full["router.weight"]}
    if mode == "ep":
        n_local = N_EXPERTS // WORLD
        for local in range(n_local):
            for name in ("linear_fc1.weight", "linear_fc2.weight"):
                source = f"experts.local_experts.{rank * n_local + local}.{name}"
                state[f"experts.local_experts.{local}.{name}"] = full[source]
        return state
    rows = slice(rank * D_FF // WORLD, (rank + 1) * D_FF // WORLD)
    for e in range(N_EXPERTS):
        prefix = f"experts.local_experts.{e}"
        gate, up = full[f"{prefix}.linear_fc1.weight"].chunk(2, dim=0)
        state[f"{prefix}.linear_fc1.weight"] = torch.cat([gate[rows], up[rows]])
        state[f"{prefix}.linear_fc2.weight"] = full[f"{prefix}.linear_fc2.weight"][:, rows]
    return state


def _run(layer, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Forward and backward of one rank's tokens; the recorder's routing statistics."""
    recorder = RoutingRecorder(layer)
    y, _ = layer(x)
    (y * x.flip(-1)).sum().backward()  # an upstream gradient that each token carries
    summary = recorder.end_step()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    return {
        "y": y.detach(),
        "counts": summary.expert_counts,
        "alignment": summary.projection_alignment,
        **grads,
    }


def _rank_main(rank: int, port: int, full: dict, out: str) -> None:
    """Both modes in one process per rank (one start-up and import of Megatron for both)."""
    # Megatron 0.16.1's allgather dispatcher allocates its gather buffer on
    # torch.cuda.current_device() when the group has more than one rank: point it at the CPU
    # (its code runs unmodified; on a GPU this is not needed).
    torch.cuda.current_device = lambda: "cpu"
    set_local_rank_environment(rank, WORLD, port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    for mode in MODES:
        sizes = {"ep_size": WORLD} if mode == "ep" else {"etp_size": WORLD}
        with megatron_parallel(**sizes):
            layer = megatron_moe_layer(tiny_config(), mpi_router(**OPTIONS))
            state = _local_state(full, rank, mode)
            with torch.no_grad():
                for name, param in layer.named_parameters():
                    param.copy_(state[name])
            torch.save(_run(layer, _inputs()[rank]), f"{out}/{mode}_rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_parallel_ranks_equal_one_process(tmp_path):
    with megatron_parallel():
        torch.manual_seed(3)
        layer = megatron_moe_layer(tiny_config(), mpi_router(**OPTIONS))
        full = {name: p.detach().clone() for name, p in layer.named_parameters()}
        reference = _run(layer, _inputs().transpose(0, 1).reshape(5, WORLD * 2, D_MODEL))
    mp.spawn(_rank_main, args=(free_port(), full, str(tmp_path)), nprocs=WORLD)
    expected_y = reference["y"].view(5, WORLD, 2, D_MODEL).transpose(0, 1)
    for mode in MODES:
        ranks = [torch.load(tmp_path / f"{mode}_rank{r}.pt") for r in range(WORLD)]
        y = torch.stack([result["y"] for result in ranks])  # (rank, S, B, D)
        torch.testing.assert_close(y, expected_y, rtol=1e-5, atol=1e-6)
        # R: each rank holds part of the gradient (EP: its own rows; expert TP: the part
        # through its F rows); summed over ranks (Megatron's data-parallel reduction of the
        # replicated router) it is the one-process gradient.
        torch.testing.assert_close(
            ranks[0]["router.weight"] + ranks[1]["router.weight"], reference["router.weight"]
        )
        for rank, result in enumerate(ranks):
            for name, value in _local_state(reference, rank, mode).items():
                if name != "router.weight":
                    torch.testing.assert_close(result[name], value, rtol=1e-5, atol=1e-6)
            # statistics reduced over the ranks: the one-process counts and λ′
            assert torch.equal(result["counts"], reference["counts"])
            torch.testing.assert_close(result["alignment"], reference["alignment"])
