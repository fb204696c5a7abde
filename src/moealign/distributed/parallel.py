"""Scale-out on torch.distributed: DDP, FSDP2 and expert parallelism (DESIGN.md §9).

Parallelism is applied from outside the model (torchtitan pattern): :func:`build_parallel`
returns a :class:`Parallel` for ``train.parallel`` that wraps or shards a plain model and
tells the trainer how to synchronise gradients, clip them and move whole tensors in and out of
checkpoints, so every world size reads and writes the same safetensors files.

* ``ddp``: :class:`~torch.nn.parallel.DistributedDataParallel`; gradients averaged over all
  ranks.
* ``fsdp``: FSDP2, ``fully_shard`` on every transformer block, then on the root, over a 1-D
  mesh of all ranks; parameters are ``DTensor``s sharded on dim 0 and gradients are
  reduce-scattered (averaged). Only AdamW: Muon and Hyperball need whole matrices.
* ``ep``: a (dp, ep) device mesh, dp · ep = world size. Every rank reads its own slice of the
  global batch. Each MoE layer keeps E/ep experts per rank (expert dim 0: rank j of an ep group
  holds experts j·E/ep … (j+1)·E/ep − 1); tokens reach their experts through the functional
  collectives' ``all_to_all_single_autograd`` (counts first, then tokens, and back;
  torchtitan's call), which carries gradients. After the backward pass the gradient of a
  parameter held by every rank is summed over the world, that of an expert over its dp
  replicas (the ranks with the same ep coordinate) only; both are divided by the world size,
  the DDP average.

Why the ``ep`` average is right: rank r's loss is W · (its share of the global loss) (the
trainer scales so), so the all-to-all backward leaves on the rank holding expert e the sum over
its ep group of W · ∂share/∂w_e; the sum over the dp replicas divided by W is Σ_r ∂share_r/∂w_e.

MPI with ``ep`` (DESIGN.md §3): each rank computes r'_e = C · retract(W_g[e]ᵀW_g[e] r_e) for its
own experts from its shard of W_g and the matching rows of the replicated R, then all-gathers
the E × D R' with the functional ``all_gather_single_autograd``, whose backward sums every
rank's gradient into the rows it computed (a reduce-scatter). Rank (d, j) therefore holds ∂/∂R
only in its own rows; the world sum over all ranks divided by W gives the full gradient of R.

Statistics that must be global (DESIGN.md §2, §4): the aux-loss-free bias counts are over all
E experts on every rank (the router is replicated) and are summed over the whole world in
``Router.update_expert_bias``; the marginal routing prior of the alignment loss pools the sums
over all ranks (:class:`moealign.alignment.term.RoutingPrior`); MaxVio and the other routing
statistics are computed from counts summed over all ranks (``evaluation.routing_stats``). The
balance, z- and alignment losses themselves are per micro-batch, as with one process and
gradient accumulation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from moealign.distributed.context import DistributedContext
from moealign.nn.experts import SwiGLUExperts
from moealign.nn.moe import MoELayer
from moealign.nn.routers import MPIRouter

__all__ = [
    "PARALLEL_MODES",
    "ExpertParallelExperts",
    "ExpertParallelMPIRouter",
    "Parallel",
    "apply_expert_parallel",
    "apply_fsdp",
    "full_tensor",
]

PARALLEL_MODES = ("ddp", "fsdp", "ep")


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole tensor behind a DTensor (a collective: call it on every rank); else itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


# --------------------------------------------------------------------------- FSDP2


def apply_fsdp(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """FSDP2: ``fully_shard`` every block of ``model.blocks``, then the root (in place)."""
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


# --------------------------------------------------------------------------- expert parallel


class ExpertParallelExperts(SwiGLUExperts):
    """This rank's E/ep experts of a :class:`SwiGLUExperts`, with all-to-all token dispatch.

    ``n_experts`` stays the global E (routing and counts are over all experts); the weights are
    the local slice ``[first_expert, first_expert + n_local_experts)`` of dim 0. Shape letters:
    S slots, R ranks of the ep group, X local experts.
    """

    def __init__(self, experts: SwiGLUExperts, group: dist.ProcessGroup):
        self.ep_size = dist.get_world_size(group)
        n_local = experts.n_experts // self.ep_size
        with torch.random.fork_rng(devices=[]):  # building must not move the run's RNG stream
            super().__init__(n_local, experts.d_model, experts.d_ff, experts.implementation)
        self.group = group
        self.n_local_experts = n_local
        self.first_expert = dist.get_rank(group) * n_local
        self.n_experts = experts.n_experts
        local = slice(self.first_expert, self.first_expert + n_local)
        with torch.no_grad():
            for name in ("w_gate", "w_up", "w_down"):
                getattr(self, name).copy_(getattr(experts, name)[local])
        self.to(experts.w_gate.device)

    def run_experts(self, x_SD: Tensor, counts_E: Tensor) -> Tensor:
        """Send each slot to its expert's rank, run the local experts, send the results back.

        1. exchange the per-expert counts (``all_to_all_single`` on an (R, X) tensor);
        2. exchange the slots (sorted by global expert, so by destination rank);
        3. reorder the received rows by local expert, run the grouped experts, undo the order;
        4. the reverse exchange. Steps 2 and 4 carry gradients. Experts (or whole ranks) that
           receive no slot are fine: their groups are empty.
        """
        send_counts_RX = counts_E.view(self.ep_size, self.n_local_experts)
        recv_counts_RX = torch.empty_like(send_counts_RX)
        dist.all_to_all_single(recv_counts_RX, send_counts_RX.contiguous(), group=self.group)
        send_splits, recv_splits = torch.stack(
            [send_counts_RX.sum(1), recv_counts_RX.sum(1)]
        ).tolist()  # one host sync per layer, as torchtitan's all-to-all dispatcher
        recv_SD = _all_to_all(x_SD, recv_splits, send_splits, self.group)
        local_ids_X = torch.arange(self.n_local_experts, device=x_SD.device)
        expert_of_row = torch.repeat_interleave(
            local_ids_X.repeat(self.ep_size), recv_counts_RX.flatten()
        )
        order = torch.argsort(expert_of_row, stable=True)
        y_sorted = super().run_experts(recv_SD.index_select(0, order), recv_counts_RX.sum(0))
        y_recv = torch.empty_like(y_sorted).index_copy(0, order, y_sorted)
        return _all_to_all(y_recv, send_splits, recv_splits, self.group)


def _all_to_all(
    x_SD: Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup
) -> Tensor:
    """Autograd-aware ``all_to_all_single`` on rows with uneven splits (the backward is the
    reverse exchange)."""
    return funcol.all_to_all_single_autograd(x_SD.contiguous(), out_splits, in_splits, group)


class ExpertParallelMPIRouter(MPIRouter):
    """MPI router whose experts are sharded: each rank powers its own rows of R with its own
    expert matrices and the E × D R' is all-gathered (gradients flow back; module docstring)."""

    def __init__(self, router: MPIRouter, group: dist.ProcessGroup):
        with torch.random.fork_rng(devices=[]):
            super().__init__(router.d_model, router.n_experts, router.top_k, **router.options())
        self.load_state_dict(router.state_dict())
        self.to(router.weight.device)
        self.group = group
        n_local = router.n_experts // dist.get_world_size(group)
        first = dist.get_rank(group) * n_local
        self.local_rows = slice(first, first + n_local)

    def effective_weight(self, expert_weight_XFD: Tensor) -> Tensor:
        local_XD = self.effective_rows(self.weight[self.local_rows], expert_weight_XFD)
        return funcol.all_gather_single_autograd(local_XD.contiguous(), 0, self.group)


def apply_expert_parallel(model: nn.Module, ep_group: dist.ProcessGroup) -> set[str]:
    """Shard the experts of every :class:`MoELayer` of ``model`` over ``ep_group`` (in place)
    and give MPI routers the sharded power step. Returns the names of the expert parameters.
    An ep group of one rank leaves the model as it is (every rank holds every expert)."""
    if dist.get_world_size(ep_group) == 1:
        return set()
    for layer in model.modules():
        if not isinstance(layer, MoELayer):
            continue
        if layer.n_experts % dist.get_world_size(ep_group):
            raise ValueError(
                f"train.ep_size={dist.get_world_size(ep_group)} is not accepted: it must "
                f"divide the layer's n_experts={layer.n_experts}"
            )
        layer.experts = ExpertParallelExperts(layer.experts, ep_group)
        if isinstance(layer.router, MPIRouter):
            layer.router = ExpertParallelMPIRouter(layer.router, ep_group)
    return {
        f"{prefix}.{name}"
        for prefix, module in model.named_modules()
        if isinstance(module, ExpertParallelExperts)
        for name, _ in module.named_parameters()
    }


# --------------------------------------------------------------------------- the plan


class Parallel:
    """How the trainer runs on ``ctx.world_size`` ranks in ``mode`` (see the module docstring).

    One process (world size 1) is plain for every mode. Methods that communicate must be
    called on every rank.
    """

    def __init__(self, mode: str, ctx: DistributedContext, ep_size: int = 1):
        if mode not in PARALLEL_MODES:
            raise ValueError(f"train.parallel={mode!r} is not accepted; choose {PARALLEL_MODES}")
        if mode == "ep" and ctx.enabled and ctx.world_size % ep_size:
            raise ValueError(
                f"train.ep_size={ep_size} is not accepted: it must divide the world size "
                f"{ctx.world_size}"
            )
        self.mode = mode if ctx.enabled else "single"
        self.ctx = ctx
        self.ep_size = ep_size if self.mode == "ep" else 1
        self.mesh: DeviceMesh | None = None
        self.expert_names: set[str] = set()

    @property
    def shards(self) -> bool:
        """Whether parameters are split over ranks (checkpoints then gather and re-shard)."""
        return self.mode in ("fsdp", "ep")

    # ---------------------------------------------------------------- set-up

    def apply(self, model: nn.Module) -> nn.Module:
        """Shard ``model`` in place as the mode says; returns the module to call forward on."""
        device_type = self.ctx.device.type
        if self.mode == "ddp":
            device_ids = [self.ctx.device.index] if device_type == "cuda" else None
            return DistributedDataParallel(model, device_ids=device_ids)
        if self.mode == "fsdp":
            self.mesh = init_device_mesh(device_type, (self.ctx.world_size,))
            return apply_fsdp(model, self.mesh)
        if self.mode == "ep":
            shape = (self.ctx.world_size // self.ep_size, self.ep_size)
            self.mesh = init_device_mesh(device_type, shape, mesh_dim_names=("dp", "ep"))
            self.expert_names = apply_expert_parallel(model, self.mesh.get_group("ep"))
        return model

    # ---------------------------------------------------------------- gradients

    @contextlib.contextmanager
    def accumulating(self, forward_model: nn.Module, sync: bool) -> Iterator[None]:
        """Around one micro-batch: gradients are synchronised only when ``sync`` (the last)."""
        if self.mode == "ddp" and not sync:
            with forward_model.no_sync():
                yield
            return
        if self.mode == "fsdp":
            forward_model.set_requires_gradient_sync(sync)
        yield

    def reduce_gradients(self, model: nn.Module) -> None:
        """``ep`` only: average the gradients (module docstring); DDP and FSDP did it already.

        A parameter without a gradient on this rank takes zeros, so that every rank runs the
        same collectives.
        """
        if self.mode != "ep":
            return
        world, expert = [], []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            (expert if name in self.expert_names else world).append(param.grad)
        for grads, group in ((world, None), (expert, self.mesh.get_group("dp"))):
            if not grads:
                continue
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=group)
            flat.div_(self.ctx.world_size)
            for grad, reduced in zip(
                grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True
            ):
                grad.copy_(reduced)

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> float:
        """Clip by the global ‖g‖₂ over all parameters (over expert shards too); returns it."""
        named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
        if self.mode != "ep":
            norm = torch.nn.utils.clip_grad_norm_([p for _, p in named], max_norm)
            return float(full_tensor(norm))
        squares = torch.zeros(2, dtype=torch.float64, device=self.ctx.device)
        for name, param in named:
            squares[int(name in self.expert_names)] += param.grad.double().square().sum()
        dist.all_reduce(squares[1:], group=self.mesh.get_group("ep"))
        norm = float(squares.sum().sqrt())
        if norm > max_norm:
            torch.nn.utils.clip_grads_with_norm_(
                [p for _, p in named], max_norm, torch.tensor(norm)
            )
        return norm

    # ---------------------------------------------------------------- whole tensors

    def _gather(self, name: str | None, local: Tensor) -> Tensor:
        if isinstance(local, DTensor):
            return local.full_tensor()
        if name is not None and name in self.expert_names:
            pieces = [torch.empty_like(local) for _ in range(self.ep_size)]
            dist.all_gather(pieces, local.contiguous(), group=self.mesh.get_group("ep"))
            return torch.cat(pieces)
        return local

    def _shard(self, name: str | None, live: Tensor, whole: Tensor) -> Tensor:
        whole = whole.to(device=live.device, dtype=live.dtype)
        if isinstance(live, DTensor):
            return distribute_tensor(whole, live.device_mesh, live.placements)
        if name is not None and name in self.expert_names:
            return whole.chunk(self.ep_size)[dist.get_rank(self.mesh.get_group("ep"))]
        return whole

    def full_model_state(self, model: nn.Module) -> dict[str, Tensor]:
        """The plain model's state dict, whole tensors on the CPU (a collective)."""
        return {
            name: self._gather(name, value.detach()).cpu()
            for name, value in model.state_dict().items()
        }

    def full_gradients(self, model: nn.Module) -> dict[str, Tensor]:
        """Each parameter's whole gradient on the CPU, by name (a collective; for tests and
        debugging: the same numbers at any world size and mode)."""
        return {
            name: self._gather(name, param.grad).cpu()
            for name, param in model.named_parameters()
            if param.grad is not None
        }

    def load_full_model_state(self, model: nn.Module, state: Mapping[str, Tensor]) -> None:
        """Load a plain model's state dict into the (sharded) ``model``."""
        live = model.state_dict()
        model.load_state_dict(
            {name: self._shard(name, live[name], state[name]) for name in live}, strict=True
        )

    def _param_names(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
        """The names of the optimizer's parameters in its state-dict order."""
        names = {id(p): n for n, p in model.named_parameters()}
        return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]

    def full_optimizer_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, Any]:
        """``optimizer.state_dict()`` with every per-parameter tensor whole (a collective)."""
        state = optimizer.state_dict()  # its per-parameter dicts are the live ones: copy
        names = self._param_names(model, optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        state["state"] = {
            index: {
                key: self._gather(names[index], value).detach().cpu()
                if _is_per_element(value, params[index])
                else value
                for key, value in per_param.items()
            }
            for index, per_param in state["state"].items()
        }
        return state

    def load_full_optimizer_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        """Load a state written by :meth:`full_optimizer_state` at any world size."""
        names = self._param_names(model, optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for index, per_param in state["state"].items():
            param = params[int(index)]
            for key, value in per_param.items():
                if isinstance(value, Tensor) and value.dim() > 0:
                    if tuple(value.shape) == tuple(_whole_shape(self, names[int(index)], param)):
                        per_param[key] = self._shard(names[int(index)], param, value)
        optimizer.load_state_dict(state)


def _is_per_element(value: Any, param: Tensor) -> bool:
    return isinstance(value, Tensor) and value.dim() > 0 and value.shape == param.shape


def _whole_shape(plan: Parallel, name: str, param: Tensor) -> tuple[int, ...]:
    if name in plan.expert_names:
        return (param.shape[0] * plan.ep_size, *param.shape[1:])
    return tuple(param.shape)  # a DTensor's shape is already the global one
