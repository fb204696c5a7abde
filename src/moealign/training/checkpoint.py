"""Checkpoints: safetensors weights + optimizer state + JSON trainer state, written atomically.

Layout (DESIGN.md §8), one directory per optimizer step under a run's ``checkpoints/``::

    step_000123/
      model.safetensors       model.state_dict() (tied weights stored once)
      optimizer.safetensors   every tensor of optimizer.state_dict(); the non-tensor structure
                              (param groups, step counters, nesting) as a JSON index in the
                              file's metadata
      state.json              {"step", "files": {name: sha256}, "trainer": {...}} with the
                              scheduler, RNG and data-stream states and any extra state

No pickle anywhere: nested Python state is encoded to JSON by :func:`encode_state`
(dict keys of any JSON scalar type, tuples, tensors and numpy arrays are tagged so that
:func:`decode_state` rebuilds them exactly). A checkpoint is written to a temporary directory
(``.tmp-step_*``, removed by the next run if a kill leaves it) and ``os.replace``-d into place,
so a crash or a full disk never leaves a half-written ``step_*`` directory nor touches the
previous one; loading checks ``state.json`` (types, the step, a SHA-256 for both the model and
the optimizer file) and every file's SHA-256, and names the file that is truncated or corrupt.
:func:`load_latest` falls back to the previous checkpoint on *any* failure to load or apply one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from moealign.io import FileFormatError, read_json, temporary_name

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointWriteError",
    "capture_rng_state",
    "decode_state",
    "encode_state",
    "list_checkpoints",
    "load_checkpoint",
    "load_latest",
    "restore_rng_state",
    "save_checkpoint",
]

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_INDEX_KEY = "moealign_index"
REQUIRED_FILES = (MODEL_FILE, OPTIMIZER_FILE)


class CheckpointError(ValueError):
    """A checkpoint that is missing files, truncated or corrupt; the message names the file."""


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (e.g. a full disk); the previous one is kept."""


def _one_line(err: BaseException) -> str:
    if isinstance(err, KeyError) and err.args:
        return f"missing key {err.args[0]!r}"
    return " ".join(str(err).split()) or type(err).__name__


# --------------------------------------------------------------------------- state encoding


def encode_state(obj: Any, tensors: dict[str, torch.Tensor] | None = None, path: str = "") -> Any:
    """Encode nested Python state as JSON-ready data.

    Tensors go into ``tensors`` under their path (``"state/0/exp_avg"``) and are replaced by
    ``{"__tensor__": path}``; with ``tensors=None`` they are written inline as
    ``{"__tensor_data__": {dtype, shape, values}}`` (exact for every float dtype: JSON floats
    are float64). Tuples, numpy arrays and dicts whose keys are not all strings are tagged.
    """
    if isinstance(obj, torch.Tensor):
        if tensors is not None:
            tensors[path] = obj.detach().cpu().contiguous()
            return {"__tensor__": path}
        data = obj.detach().cpu()
        return {
            "__tensor_data__": {
                "dtype": str(data.dtype).removeprefix("torch."),
                "shape": list(data.shape),
                "values": data.flatten().tolist(),
            }
        }
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": {"dtype": str(obj.dtype), "values": obj.tolist()}}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        items = [
            (k, encode_state(v, tensors, f"{path}/{k}" if path else str(k))) for k, v in obj.items()
        ]
        if all(isinstance(k, str) and not k.startswith("__") for k, _ in items):
            return dict(items)
        return {"__dict__": [[k, v] for k, v in items]}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_state(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_state(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a value of type {type(obj).__name__} at {path!r}")


def decode_state(obj: Any, tensors: dict[str, torch.Tensor] | None = None) -> Any:
    """Inverse of :func:`encode_state`."""
    if isinstance(obj, list):
        return [decode_state(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        if tensors is None:
            raise CheckpointError(f"tensor {obj['__tensor__']!r} referenced but no tensor file")
        return tensors[obj["__tensor__"]]
    if "__tensor_data__" in obj:
        spec = obj["__tensor_data__"]
        dtype = getattr(torch, str(spec["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"tensor dtype {spec['dtype']!r} is not a torch dtype")
        return torch.tensor(spec["values"], dtype=dtype).reshape(spec["shape"])
    if "__ndarray__" in obj:
        spec = obj["__ndarray__"]
        return np.asarray(spec["values"], dtype=spec["dtype"])
    if "__tuple__" in obj:
        return tuple(decode_state(v, tensors) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {k: decode_state(v, tensors) for k, v in obj["__dict__"]}
    return {k: decode_state(v, tensors) for k, v in obj.items()}


# --------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict[str, Any]:
    """The states of Python's, NumPy's and torch's (CPU and every CUDA device's) generators."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore generators captured by :func:`capture_rng_state` (after :func:`decode_state`)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- files


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """``step_*`` checkpoint directories under ``directory``, oldest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [
        (int(match.group(1)), entry)
        for entry in directory.iterdir()
        if entry.is_dir() and (match := _STEP_DIR.match(entry.name))
    ]
    return [entry for _, entry in sorted(found)]


def save_checkpoint(
    directory: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | Mapping[str, Any],
    trainer_state: dict[str, Any],
    keep: int,
) -> Path:
    """Write ``directory/step_{step:06d}`` atomically and delete all but the newest ``keep``.

    ``optimizer`` is an optimizer or a state dict of one (the whole-tensor state that
    :class:`moealign.distributed.parallel.Parallel` gathers from sharded ranks).

    ``trainer_state`` is any nested state :func:`encode_state` accepts (scheduler, RNG, data
    stream, extra state); tensors in it are stored inline in ``state.json``.
    """
    if keep < 1:
        raise ValueError(f"keep: got {keep}; expected >= 1")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / step_dir_name(step)
    tmp = directory / temporary_name(final.name)
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        _write_files(tmp, step, model, optimizer, trainer_state)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, TypeError):  # state that cannot be encoded: a programming error
            raise
        errno = getattr(err, "errno", None) or 5
        raise CheckpointWriteError(
            errno,
            f"cannot write checkpoint {final}: {_one_line(err)}; the previous checkpoint is kept",
        ) from None

    if final.exists():  # re-saving the same step (e.g. on a signal right after a periodic save)
        stale = directory / temporary_name(f"stale-{final.name}")
        os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale)
    else:
        os.replace(tmp, final)
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old)
    return final


def _write_files(
    folder: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | Mapping[str, Any],
    trainer_state: dict[str, Any],
) -> None:
    """The three files of a checkpoint, fsynced, into ``folder``."""
    save_model(model, str(folder / MODEL_FILE))
    optimizer_tensors: dict[str, torch.Tensor] = {}
    if isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.state_dict()
    index = encode_state(dict(optimizer), optimizer_tensors)
    save_file(
        optimizer_tensors, str(folder / OPTIMIZER_FILE), metadata={_INDEX_KEY: json.dumps(index)}
    )
    files = {name: _sha256(folder / name) for name in REQUIRED_FILES}
    state = {"step": step, "files": files, "trainer": encode_state(trainer_state)}
    with open(folder / STATE_FILE, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(state))
    for name in (*REQUIRED_FILES, STATE_FILE):
        _fsync(folder / name)


@dataclass
class Checkpoint:
    """A verified checkpoint directory: its step and decoded trainer state."""

    path: Path
    step: int
    trainer_state: dict[str, Any]

    def load_model(self, model: torch.nn.Module) -> None:
        """Load the weights into ``model`` (strict; tied weights restored from one tensor)."""
        load_model(model, str(self.path / MODEL_FILE), strict=True, device=_device_of(model))

    def load_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Load the optimizer state (moved to the parameters' device by torch)."""
        optimizer.load_state_dict(self.optimizer_state())

    def optimizer_state(self) -> dict[str, Any]:
        """The saved ``optimizer.state_dict()`` (tensors on the CPU)."""
        file = self.path / OPTIMIZER_FILE
        with safe_open(str(file), framework="pt") as handle:
            index = json.loads(handle.metadata()[_INDEX_KEY])
        return decode_state(index, load_file(str(file)))


def _device_of(model: torch.nn.Module) -> str:
    first = next(iter(model.parameters()), None)
    return str(first.device) if first is not None else "cpu"


def _parse_state(state: Any, path: Path) -> tuple[int, dict[str, str], dict[str, Any]]:
    """(step, files, trainer state) of a ``state.json``; ValueError/TypeError/KeyError on
    anything malformed."""
    if not isinstance(state, dict):
        raise TypeError(f"a JSON {type(state).__name__}; expected an object")
    step, files = state["step"], state["files"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise TypeError(f"step {step!r} is not an integer >= 0")
    match = _STEP_DIR.match(path.name)
    if match and int(match.group(1)) != step:
        raise ValueError(f"step {step} does not match the folder name {path.name}")
    if not isinstance(files, dict):
        raise TypeError(f"files is a {type(files).__name__}; expected an object")
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        raise ValueError(f"files lists no checksum for {', '.join(missing)}")
    for name, digest in files.items():
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"files names {name!r}, not a file of the checkpoint")
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise ValueError(f"the checksum of {name} is not a SHA-256 hex digest")
    trainer_state = decode_state(state["trainer"])
    if not isinstance(trainer_state, dict):
        raise TypeError(f"trainer is a {type(trainer_state).__name__}; expected an object")
    return step, files, trainer_state


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Open and verify one ``step_*`` directory; raise :class:`CheckpointError` naming the bad
    file if a file is missing, truncated, malformed, or does not match its recorded SHA-256
    (both the model and the optimizer file must have one)."""
    path = Path(path)
    state_file = path / STATE_FILE
    try:
        step, files, trainer_state = _parse_state(read_json(state_file), path)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {state_file} is missing") from None
    except FileFormatError as err:
        reason = str(err).removeprefix(f"{state_file}: ")
        raise CheckpointError(
            f"checkpoint file {state_file} is corrupt or truncated: {reason}"
        ) from None
    except OSError as err:
        raise CheckpointError(
            f"checkpoint file {state_file} is unreadable: {err.strerror}"
        ) from None
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError) as err:
        raise CheckpointError(
            f"checkpoint file {state_file} is corrupt or truncated: {_one_line(err)}"
        ) from None
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint file {file} is missing")
        if _sha256(file) != expected:
            raise CheckpointError(
                f"checkpoint file {file} is corrupt or truncated "
                "(its SHA-256 does not match state.json)"
            )
    return Checkpoint(path=path, step=step, trainer_state=trainer_state)


def load_latest(
    directory: str | Path,
    fallback: bool = False,
    warn: Callable[[str], None] = log.warning,
    apply: Callable[[Checkpoint], None] | None = None,
) -> Checkpoint | None:
    """The newest verified checkpoint under ``directory`` (None if there is none), after
    ``apply(checkpoint)`` (e.g. loading it into a model and optimizer) succeeded on it.

    A checkpoint that fails verification, or whose ``apply`` raises anything (bad types,
    missing keys, unreadable or wrong-shape tensors), raises :class:`CheckpointError`; with
    ``fallback=True`` it is reported through ``warn`` and the next older one is tried instead
    (its ``apply`` then overwrites whatever the failed one had set).
    """
    candidates = list_checkpoints(directory)
    errors: list[str] = []
    for path in reversed(candidates):
        try:
            checkpoint = load_checkpoint(path)
            if apply is not None:
                apply(checkpoint)
        except Exception as err:  # any failure to load or apply makes the checkpoint unusable
            if not isinstance(err, CheckpointError):
                err = CheckpointError(f"checkpoint {path} cannot be loaded: {_one_line(err)}")
            if not fallback:
                raise err from None
            errors.append(str(err))
            warn(f"skipping unusable checkpoint: {err}")
            continue
        if errors:
            warn(f"falling back to checkpoint {path}")
        return checkpoint
    if errors:
        raise CheckpointError(
            "no usable checkpoint in " + str(directory) + ": " + "; ".join(errors)
        )
    return None
