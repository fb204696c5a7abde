"""Checks that a run can start, made before any work (data, model, run folder) begins.

:func:`check_before_training` adds to what loading the config already checked (types, bounds,
nested option tables, every component that builds without files or devices) the parts that
depend on this machine: the device exists, the output folder and ``data.cache_dir`` are
folders that can be written, the data files and the alignment prior file can be read and fit
the model, the model's parameters, gradients and optimizer state fit in the memory that is
available, and ``torch.compile`` runs here when ``train.compile`` asks for it. Each problem is
one :class:`moealign.config.ConfigError` naming the field.

Memory estimate (fp32 training state, activations not counted): bytes ≈ 4 · (P · (2 + s) + B)
with P the parameters, B the buffers (both counted by building the model on the ``meta``
device), s the optimizer's state tensors per parameter (AdamW and AdamH: 2; Muon and MuonH: 1
for their matrices, 2 for the AdamW groups) and the 2 for the weights and their gradients;
FSDP2 divides it over the ranks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from moealign.config import ConfigError, RunConfig, meta_device

__all__ = [
    "available_memory_bytes",
    "check_before_training",
    "check_compile",
    "check_device",
    "check_writable_folder",
    "training_memory_bytes",
]

_FLOAT_BYTES = 4
_GIB = 2**30


def check_device(device: str, field: str = "train.device") -> None:
    """A ``cuda`` device only where CUDA is available."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            field, "got 'cuda' but no CUDA device is available here; expected 'auto' or 'cpu'"
        )


def check_writable_folder(path: str | Path, field: str, writes: str = "files") -> None:
    """May a command that writes ``writes`` (``run``, ``study``, ``report``, ``export``,
    ``compress``, ``files``) write the folder ``path``? The one guard of every writer:

    * neither ``path`` nor a parent is a file, and its nearest existing ancestor is writable;
    * ``path`` is not a dangling symbolic link (named as given), nor any link for ``export``
      and ``compress``, which create their folder;
    * no folder above it (links resolved) is a moealign run (:func:`folder_kind`): a run's
      checkpoints and records belong to it alone (a run's own ``report`` folder excepted
      for ``report``);
    * ``path`` itself, if it holds a moealign run, study or report, holds the kind the command
      writes (a command never writes into another's folder).

    Raises :class:`ConfigError` naming ``field`` and ``path`` as given.
    """
    from moealign.training.runs import folder_kind

    path = Path(path)
    shown = str(path)
    if path.is_symlink():
        target = os.readlink(path)
        if not path.exists():
            raise ConfigError(
                field, f"got {shown!r}, a symbolic link to {target!r}, which does not exist"
            )
        if writes in ("export", "compress"):
            raise ConfigError(
                field, f"got {shown!r}, a symbolic link to {target!r}; expected a new folder"
            )
    for ancestor in (path, *path.parents):
        if not ancestor.exists():
            continue
        if not ancestor.is_dir():
            where = "it" if ancestor == path else f"its parent {ancestor}"
            raise ConfigError(field, f"got {shown!r}, but {where} is not a folder")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise ConfigError(field, f"got {shown!r}, but {ancestor} is not writable")
        break
    real = Path(os.path.realpath(path))
    for ancestor in real.parents:
        if folder_kind(ancestor) == "run" and not (
            writes == "report" and real == ancestor / "report"
        ):
            raise ConfigError(
                field,
                f"got {shown!r}, which is inside the run folder {str(ancestor)!r}; a run's "
                "folder holds only what its own commands write: choose a folder outside it",
            )
    kind = folder_kind(real)
    if kind is not None and kind != writes:
        raise ConfigError(
            field,
            f"got {shown!r}, which holds a moealign {kind}; `{writes}` does not write into "
            "it: choose a new or empty folder",
        )


def _check_data_files(config: RunConfig) -> None:
    if config.data.source != "files":
        return
    for index, name in enumerate(config.data.paths):
        path = Path(name)
        if not path.is_file() or not os.access(path, os.R_OK):
            problem = "is a folder" if path.is_dir() else "is not a readable file"
            raise ConfigError(f"data.paths[{index}]", f"got {name!r}, which {problem}")


def _check_prior(config: RunConfig) -> None:
    """Read the alignment prior file and check it against the model (shapes only in memory)."""
    if config.alignment.schedule == "none" or config.alignment.prior != "file":
        return
    try:
        with meta_device():  # the uniform stand-in tensors stay shapes; the file is read
            config.alignment.build(config.model.n_moe_layers, config.model.n_experts)
    except ConfigError:
        raise
    except ValueError as err:  # RoutingPrior names alignment.prior_path in its message
        raise ConfigError("", str(err)) from None
    except Exception as err:  # an unreadable file: safetensors' own error types
        reason = " ".join(str(err).split())
        raise ConfigError(
            "alignment.prior_path",
            f"got {config.alignment.prior_path!r}, which cannot be read as safetensors: {reason}",
        ) from None


def training_memory_bytes(config: RunConfig) -> int:
    """The estimate of the module docstring for one process."""
    from moealign.optim.optimizers import parameter_groups

    with meta_device():
        model = config.model.build()
    matrix_params, adamw_params = parameter_groups(model)
    states_per_matrix = 1 if config.optim.name in ("muon", "muonh") else 2
    matrix = sum(p.numel() for p in matrix_params)
    other = sum(p.numel() for p in adamw_params)
    buffers = sum(b.numel() for b in model.buffers())
    total = matrix * (2 + states_per_matrix) + other * (2 + 2) + buffers
    if config.train.parallel == "fsdp":
        total //= max(1, int(os.environ.get("WORLD_SIZE", "1")))
    return total * _FLOAT_BYTES


def available_memory_bytes(device: Any) -> int:
    """Free memory of ``device``: ``torch.cuda.mem_get_info`` on a GPU; on the CPU the
    ``MemAvailable`` of ``/proc/meminfo`` (Linux), else the physical memory."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/meminfo") as handle:
                for line in handle:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_compile(config: RunConfig) -> None:
    """With ``train.compile``, ``torch.compile`` must run on the run's device here."""
    if not config.train.compile:
        return
    from moealign.distributed.context import resolve_device
    from moealign.nn.compile import compile_unavailable_reason

    device = resolve_device(config.train.device, int(os.environ.get("LOCAL_RANK", "0")))
    reason = compile_unavailable_reason(device.type)
    if reason is not None:
        raise ConfigError(
            "train.compile",
            f"got true, but torch.compile cannot run on {device.type} here ({reason}); "
            "expected false (torch.compile needs a C++ compiler on the CPU, Triton on CUDA)",
        )


def _check_memory(config: RunConfig) -> None:
    from moealign.distributed.context import resolve_device

    needed = training_memory_bytes(config)
    device = resolve_device(config.train.device, int(os.environ.get("LOCAL_RANK", "0")))
    available = available_memory_bytes(device)
    if needed > available:
        raise ConfigError(
            "model",
            f"the parameters, gradients and {config.optim.name} state need about "
            f"{needed / _GIB:,.1f} GiB, more than the {available / _GIB:,.1f} GiB available on "
            f"{device}; make the model smaller (model.n_experts, model.d_model, model.n_layers, "
            "model.expert_d_ff, model.vocab_size)",
        )


def check_before_training(
    config: RunConfig, run_dir: str | Path, out_field: str = "out_dir"
) -> None:
    """Every check of the module docstring for a run of ``config`` written to ``run_dir``
    (``out_field`` names where the user gave it: ``out_dir`` or ``--out``)."""
    check_device(config.train.device)
    check_writable_folder(run_dir, out_field, writes="run")
    cache = Path(config.data.cache_dir)
    if cache.exists() and not cache.is_dir():
        raise ConfigError("data.cache_dir", f"got {str(cache)!r}, which is not a folder")
    if config.data.tokenizer == "bpe":
        check_writable_folder(cache, "data.cache_dir")
    _check_data_files(config)
    _check_memory(config)
    _check_prior(config)
    check_compile(config)
