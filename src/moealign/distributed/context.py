"""torch.distributed set-up for data parallel training (DESIGN.md §9).

The same code path runs with and without torchrun: when ``WORLD_SIZE`` > 1 is set in the
environment (torchrun, or a test that spawns ranks and sets ``RANK``/``WORLD_SIZE``/
``MASTER_ADDR``/``MASTER_PORT``), the process group is initialised with ``gloo`` on CPU and
``nccl`` on CUDA; otherwise everything is a single process and the collectives are no-ops.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistributedContext", "free_port", "resolve_device", "set_local_rank_environment"]


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` → ``cuda:<local_rank>`` if CUDA is available else ``cpu``; ``"cuda"`` fails
    clearly when there is no GPU."""
    if preference not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device: got {preference!r}; expected 'auto', 'cpu' or 'cuda'")
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device: got 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that the operating system reports free (bound to port 0, then
    released), for the rendezvous of ranks spawned on this machine."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def set_local_rank_environment(rank: int, world_size: int, port: int) -> None:
    """Set the variables torchrun would give rank ``rank`` of ``world_size`` processes on this
    machine (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` = 127.0.0.1,
    ``MASTER_PORT`` = ``port``), for ranks started with ``torch.multiprocessing.spawn``."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )


@dataclass
class DistributedContext:
    """This process's place in the data-parallel group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_preference: str = "auto") -> DistributedContext:
        """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and initialise the process group if
        needed (``gloo`` on CPU, ``nccl`` on CUDA)."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
        device = resolve_device(device_preference, local_rank)
        owns_group = False
        if world_size > 1 and device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            # Ranks on one machine share its cores: more threads than cores make OpenMP spin
            # (steps several times slower). torchrun sets OMP_NUM_THREADS=1 itself.
            local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size))
        if world_size > 1 and not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
            owns_group = True
        return cls(rank, world_size, local_rank, device, owns_group)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place (no-op for one process); returns it."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank."""
        if not self.enabled:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def close(self) -> None:
        """Destroy the process group if this context created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False
