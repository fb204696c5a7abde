"""Run directories: the resolved config, provenance, metrics, checkpoints and final results.

Layout (DESIGN.md §8)::

    <out_dir>/<name>/
      config.json        the resolved RunConfig (RunConfig.to_dict())
      meta.json          seed, package versions, git commit, host, device, command line, times
      metrics.jsonl      one JSON object per logged step, appended and flushed
      checkpoints/       step_* directories (moealign.training.checkpoint)
      tokenizer/         the run's tokenizer as Hugging Face files (AutoTokenizer loads it)
      final_eval.json    the evaluation at the end of training

An existing run is never overwritten by accident: opening a directory that already holds a
run needs ``resume=True`` (continue it, with an unchanged config apart from ``train.steps``)
or ``overwrite=True`` (delete it and start again).
"""

from __future__ import annotations

import json
import platform
import shutil
import socket
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import moealign

__all__ = [
    "RunDirectory",
    "RunExistsError",
    "environment_info",
    "flatten_config",
    "git_commit",
    "peak_memory_bytes",
    "utc_now",
]

CONFIG_FILE = "config.json"
META_FILE = "meta.json"
METRICS_FILE = "metrics.jsonl"
FINAL_EVAL_FILE = "final_eval.json"
CHECKPOINT_DIR = "checkpoints"
TOKENIZER_DIR = "tokenizer"
# Changes that do not alter the result: the budget, the dashboards the metrics go to, and the
# parallel layout (a resume on another number of ranks keeps world size × grad_accum, so the
# global batch and its micro-batches stay the same; checkpoints hold whole tensors).
_RESUMABLE_CHANGES = {
    "train.steps",
    "train.tensorboard",
    "train.wandb",
    "train.grad_accum",
    "train.parallel",
    "train.ep_size",
}


class RunExistsError(ValueError):
    """The run directory already holds a run and neither resume nor overwrite was asked for."""


def git_commit() -> str:
    """``git rev-parse HEAD`` of the tree holding the moealign sources, or ``"unknown"``."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(moealign.__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip() or "unknown"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment_info() -> dict[str, Any]:
    """Versions of Python and the key packages, the git commit, host and command line."""
    return {
        "python": platform.python_version(),
        "versions": {
            "moealign": moealign.__version__,
            **{p: _version(p) for p in ("torch", "numpy", "transformers", "safetensors")},
        },
        "git_commit": git_commit(),
        "hostname": socket.gethostname(),
        "command": sys.argv,
    }


def peak_memory_bytes(device: Any) -> int:
    """Peak memory of this process so far: ``torch.cuda.max_memory_allocated(device)`` on a
    CUDA device, else the peak resident set size from ``getrusage`` (kilobytes on Linux, bytes
    on macOS)."""
    import torch

    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1e-3}}`` → ``{"optim.lr": 1e-3}`` (an empty table stays a value)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, name))
        else:
            flat[name] = value
    return flat


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


class RunDirectory:
    """One run's directory; create it with :meth:`open`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def open(
        cls,
        path: str | Path,
        config: dict[str, Any],
        *,
        seed: int,
        device: str,
        resume: bool = False,
        overwrite: bool = False,
    ) -> RunDirectory:
        """Create (or, with ``resume``, reopen) the run directory and record config and meta.

        Raises :class:`RunExistsError` if ``path`` holds a run and neither ``resume`` nor
        ``overwrite`` is set, or if resuming with a config that differs in more than
        ``train.steps``.
        """
        if resume and overwrite:
            raise ValueError("resume and overwrite: got both; expected at most one of them")
        run = cls(Path(path))
        existing = run.path / CONFIG_FILE
        if existing.exists() and not resume:
            if not overwrite:
                raise RunExistsError(
                    f"run directory {run.path} already holds a run; "
                    "pass --resume to continue it or --overwrite to replace it"
                )
            shutil.rmtree(run.path)
        run.path.mkdir(parents=True, exist_ok=True)
        run.checkpoint_dir.mkdir(exist_ok=True)
        if resume and existing.exists():
            run._check_same_config(json.loads(existing.read_text()), config)
            meta = json.loads((run.path / META_FILE).read_text())
            meta.setdefault("resumed", []).append({"time": utc_now(), "command": sys.argv})
        else:
            meta = {"seed": seed, "device": device, "start_time": utc_now(), **environment_info()}
        _write_json(run.path / CONFIG_FILE, config)
        _write_json(run.path / META_FILE, meta)
        return run

    def _check_same_config(self, old: dict[str, Any], new: dict[str, Any]) -> None:
        old_flat, new_flat = flatten_config(old), flatten_config(new)
        changed = sorted(
            key
            for key in old_flat.keys() | new_flat.keys()
            if old_flat.get(key) != new_flat.get(key) and key not in _RESUMABLE_CHANGES
        )
        if changed:
            details = ", ".join(f"{k}: {old_flat.get(k)!r} -> {new_flat.get(k)!r}" for k in changed)
            raise RunExistsError(
                f"cannot resume {self.path}: the config differs from the recorded one in "
                f"{details}; only {', '.join(sorted(_RESUMABLE_CHANGES))} may change"
            )

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / CHECKPOINT_DIR

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    def log_metrics(self, record: dict[str, Any]) -> None:
        """Append one JSON line to ``metrics.jsonl`` and flush it to disk."""
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line]

    def truncate_metrics(self, step: int) -> None:
        """Drop records after ``step`` (logged by an interrupted run past its last checkpoint),
        so that a resumed run's ``metrics.jsonl`` matches an uninterrupted one."""
        kept = [r for r in self.read_metrics() if r.get("step", 0) <= step]
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.metrics_path)

    def write_final_eval(self, results: dict[str, Any]) -> None:
        _write_json(self.path / FINAL_EVAL_FILE, results)

    def update_meta(self, **fields: Any) -> None:
        path = self.path / META_FILE
        meta = json.loads(path.read_text())
        meta.update(fields)
        _write_json(path, meta)
