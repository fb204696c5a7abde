"""Expert parallelism in torchtitan with the MPI gate on 2 gloo CPU ranks against one process
(DESIGN.md §10): experts sharded ``Shard(0)`` over an ``ep`` mesh and dispatched by torchtitan's
own ``AllToAllTokenDispatcher``; each rank powers its own experts' router rows and R_eff is
all-gathered. Also expert tensor parallelism (``w1_EFD`` split on F, ``Shard(1)``): the partial
power products are all-reduced; and the router on a sequence-split DTensor input with a
replicated gate weight, as torchtitan's expert-parallel sharding plan runs it."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("torchtitan")

from helpers_torchtitan import D, E, build, moe_config  # noqa: E402
from moealign.distributed.context import free_port, set_local_rank_environment  # noqa: E402
from moealign.engines.torchtitan import (  # noqa: E402
    RoutingRecorder,
    mpi_moe_config,
    projection_alignments,
)

WORLD = 2
OPTIONS = {"c_prime": 2.0, "power_steps": 2}


def inputs():
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(WORLD, 3, 4, D, generator=generator)  # L even: split over the ranks
    return x, torch.randn(x.shape, generator=generator)


def run(moe, x, grad):
    """The whole layer: output, router logits and input gradient for output gradient grad."""
    x = x.clone().requires_grad_()
    with RoutingRecorder(moe) as recorder:
        y = moe(x)
    (y * grad).sum().backward()
    return {"y": y.detach(), "logits": recorder.routing[0].logits.detach(), "x_grad": x.grad}


def run_gate(moe, x, grad_logits):
    """The MPI gate alone (expert tensor parallelism shards the experts' F, whose outputs
    torchtitan's tensor-parallel plan reduces; the gate's power step is what moealign adds)."""
    logits = moe.router.gate(x)
    (logits * grad_logits).sum().backward()
    return {"logits": logits.detach()}


def shard_experts(moe, mesh, dim: int) -> None:
    """Experts as DTensors: ``Shard(0)`` = expert parallel; ``Shard(1)`` = F split (``w2_EDF``
    then on its dim 2)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    experts = moe.routed_experts.inner_experts
    for name, param in list(experts.named_parameters()):
        shard = Shard(2 if name == "w2_EDF" and dim == 1 else dim)
        setattr(experts, name, torch.nn.Parameter(distribute_tensor(param.data, mesh, [shard])))


def gradients(moe) -> dict:
    experts = moe.routed_experts.inner_experts
    w1_grad = experts.w1_EFD.grad
    w1_grad = w1_grad.full_tensor() if hasattr(w1_grad, "full_tensor") else w1_grad
    return {"gate_grad": moe.router.gate.weight.grad.clone(), "w1_grad": w1_grad}


def _rank(rank: int, port: int, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torchtitan.distributed.utils import set_spmd_backend

    set_local_rank_environment(rank, WORLD, port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    set_spmd_backend("partial_dtensor")  # torchtitan's DTensor path (no spmd_types meshes)
    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("ep",))
    x, grad = inputs()
    results = {}
    # expert parallel: rank r routes batch r; torchtitan's all-to-all dispatcher
    moe = build(mpi_moe_config(moe_config(), **OPTIONS))
    shard_experts(moe, mesh, 0)
    moe.routed_experts.token_dispatcher.wire_meshes(ep_mesh=mesh)
    results["ep"] = run(moe, x[rank], grad[rank]) | gradients(moe)
    results["ep"]["alignment"] = projection_alignments(moe, "effective")
    dist.all_reduce(results["ep"]["gate_grad"])  # the data-parallel sum over the ranks' tokens
    # the router as torchtitan's EP plan runs it: gate weight replicated, input split on L
    moe = build(mpi_moe_config(moe_config(), **OPTIONS))
    shard_experts(moe, mesh, 0)
    gate = moe.router.gate
    gate.weight = torch.nn.Parameter(distribute_tensor(gate.weight.data, mesh, [Replicate()]))
    x_BLD = distribute_tensor(x.flatten(0, 1), mesh, [Shard(1)])
    scores_BLE = moe.router(x_BLD, None)[2]
    local_grad = gate_grad_logits().tensor_split(WORLD, dim=1)[rank]
    (scores_BLE.to_local() * local_grad).sum().backward()
    split_grad = gate.weight.grad.to_local().clone()
    dist.all_reduce(split_grad)  # the data-parallel sum over the ranks' tokens
    results["sequence_split"] = {
        "scores": scores_BLE.full_tensor().detach(),
        "gate_grad": split_grad,
    }
    # expert tensor parallel: every rank the same tokens, F split
    moe = build(mpi_moe_config(moe_config(), **OPTIONS))
    shard_experts(moe, mesh, 1)
    results["etp"] = run_gate(moe, x.flatten(0, 1), gate_grad_logits()) | gradients(moe)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def gate_grad_logits():
    return torch.randn(WORLD * 3, 4, E, generator=torch.Generator().manual_seed(3))


@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path):
    mp.spawn(_rank, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    x, grad = inputs()
    moe = build(mpi_moe_config(moe_config(), **OPTIONS))
    whole = run(moe, x.flatten(0, 1), grad.flatten(0, 1)) | gradients(moe)
    alignment = projection_alignments(moe, "effective")
    moe = build(mpi_moe_config(moe_config(), **OPTIONS))
    gate = run_gate(moe, x.flatten(0, 1), gate_grad_logits()) | gradients(moe)
    moe = build(mpi_moe_config(moe_config(), **OPTIONS))
    scores_BLE = moe.router(x.flatten(0, 1), None)[2]
    (scores_BLE * gate_grad_logits()).sum().backward()
    for rank, got in enumerate(ranks):
        ep, etp = got["ep"], got["etp"]
        for name in ("y", "logits", "x_grad"):  # rank r holds batch r
            mine = whole[name].unflatten(0, (WORLD, -1))[rank]
            torch.testing.assert_close(ep[name], mine, rtol=1e-4, atol=1e-5, msg=name)
        for name in ("gate_grad", "w1_grad"):
            torch.testing.assert_close(ep[name], whole[name], rtol=1e-4, atol=1e-5, msg=name)
            torch.testing.assert_close(etp[name], gate[name], rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(etp["logits"], gate["logits"], rtol=1e-5, atol=1e-6)
        assert ep["alignment"] == pytest.approx(alignment, rel=1e-5)
        split = got["sequence_split"]
        torch.testing.assert_close(split["scores"], scores_BLE.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            split["gate_grad"], moe.router.gate.weight.grad, rtol=1e-4, atol=1e-5
        )
