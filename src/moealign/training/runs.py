"""Run directories: the resolved config, provenance, metrics, checkpoints and final results.

Layout (DESIGN.md §8)::

    <out_dir>/<name>/
      config.json        the resolved RunConfig (RunConfig.to_dict())
      meta.json          seed, package versions, git commit, host, device, command line, times
      metrics.jsonl      one JSON object per logged step, each appended whole and flushed
      checkpoints/       step_* directories (moealign.training.checkpoint)
      tokenizer/         the run's tokenizer as Hugging Face files (AutoTokenizer loads it)
      final_eval.json    the evaluation at the end of training
      .moealign.json     the marker: {"kind": "run", "format": 1}
      .lock              held (flock) by the process writing or reading the run

A folder is a *run* when its marker says so (:func:`folder_kind`; a run written before the
marker existed is recognised by the provenance moealign wrote into its ``meta.json``, and gets
the marker when it is resumed). Nothing is lost by accident: opening a folder that holds a run
needs ``resume=True`` (continue it, with an unchanged config apart from ``train.steps``) or
``overwrite=True`` (replace it); a folder that holds anything else is never written into or
deleted; one process at a time holds a run folder (:class:`RunLock`, naming the holder's pid);
a run whose lock, checkpoints or records are symbolic links is refused (a write would land in
what the link points at). A resume checks every record it will rewrite (meta, metrics, final
evaluation) before it writes anything. Temporary ``.tmp-*`` entries that a killed writer left
are removed when a run is opened. Checkpoints carry :func:`run_identity` (the hash of the
config that must not change on resume, seed included): a resume refuses a foreign one.
"""

from __future__ import annotations

import hashlib
import json
import os
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
from moealign.io import (
    TEMPORARY_PREFIX,
    append_jsonl,
    atomic_write_json,
    atomic_write_text,
    iter_jsonl,
    read_json,
    read_jsonl,
    remove_temporaries,
)

__all__ = [
    "RunDirectory",
    "RunExistsError",
    "RunLock",
    "RunLockedError",
    "check_same_config",
    "environment_info",
    "finished_step",
    "flatten_config",
    "folder_kind",
    "git_commit",
    "is_run_dir",
    "peak_memory_bytes",
    "read_run_config",
    "run_identity",
    "utc_now",
    "write_marker",
]

CONFIG_FILE = "config.json"
META_FILE = "meta.json"
METRICS_FILE = "metrics.jsonl"
FINAL_EVAL_FILE = "final_eval.json"
CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = ".lock"
TOKENIZER_DIR = "tokenizer"
MARKER_FILE = ".moealign.json"
FORMAT_VERSION = 1  # of the folders moealign writes (the marker's "format")
EVAL_FILE = "eval.json"
# Entries of a run that moealign writes or deletes in place: never a symbolic link.
_NO_LINKS = (
    LOCK_FILE,
    MARKER_FILE,
    CHECKPOINT_DIR,
    CONFIG_FILE,
    META_FILE,
    METRICS_FILE,
    FINAL_EVAL_FILE,
    EVAL_FILE,
    TOKENIZER_DIR,
)
# Changes that do not alter the result: the budget, the dashboards the metrics go to, what a
# non-finite step does (a run stopped by one may go on, skipping it), and the parallel layout
# (a resume on another number of ranks keeps world size × grad_accum, so the global batch and
# its micro-batches stay the same; checkpoints hold whole tensors).
_RESUMABLE_CHANGES = {
    "out_dir",  # where the run folder was found, not what it computes
    "train.steps",
    "train.tensorboard",
    "train.wandb",
    "train.grad_accum",
    "train.parallel",
    "train.ep_size",
    "train.on_nonfinite",
}


class RunExistsError(ValueError):
    """The run directory already holds a run (or something else) and cannot be opened as
    asked: neither resume nor overwrite, a changed config, or a folder that is not a run."""


class RunLockedError(RunExistsError):
    """Another process holds the run folder's lock."""


def write_marker(folder: str | Path, kind: str) -> None:
    """Mark ``folder`` as a moealign ``kind`` (run, study, report) of :data:`FORMAT_VERSION`."""
    atomic_write_json(Path(folder) / MARKER_FILE, {"kind": kind, "format": FORMAT_VERSION})


def _legacy_kind(path: Path) -> str | None:
    """The kind of a folder written before the marker: a run by the provenance in its
    ``meta.json`` (``versions.moealign``) beside ``metrics.jsonl`` and ``config.json``; a
    study by its ``study.json`` (``cells`` and ``study_file``)."""
    try:
        if (path / METRICS_FILE).is_file() and (path / CONFIG_FILE).is_file():
            meta = read_json(path / META_FILE)
            versions = meta.get("versions") if isinstance(meta, dict) else None
            if isinstance(versions, dict) and "moealign" in versions:
                return "run"
        if (path / "study.json").is_file():
            study = read_json(path / "study.json")
            if isinstance(study, dict) and {"cells", "study_file"} <= study.keys():
                return "study"
    except (OSError, ValueError):
        return None
    return None


def folder_kind(path: str | Path) -> str | None:
    """What moealign wrote in ``path``: ``run``, ``study`` or ``report`` by its marker (or, for
    a folder older than the marker, by content: :func:`_legacy_kind`); None for anything else.
    A marker of a newer format than this version reads is an error naming the file."""
    path = Path(path)
    marker = path / MARKER_FILE
    if not path.is_dir():
        return None
    if not marker.is_file():
        return _legacy_kind(path)
    try:
        data = read_json(marker)
    except (OSError, ValueError):
        data = None
    version = data.get("format") if isinstance(data, dict) else None
    if not (isinstance(version, int) and not isinstance(version, bool)) or not isinstance(
        data.get("kind"), str
    ):
        return _legacy_kind(path)  # a damaged marker: judged by content, as before it
    if version > FORMAT_VERSION:
        raise RunExistsError(
            f"{marker}: format {version}, newer than the {FORMAT_VERSION} this moealign "
            f"{moealign.__version__} reads; upgrade moealign"
        )
    return data["kind"]


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` is a moealign run folder (:func:`folder_kind` is ``run``)."""
    return folder_kind(path) == "run"


def check_no_links(path: str | Path) -> None:
    """Refuse a run whose lock, marker, records, checkpoints folder or a checkpoint in it is a
    symbolic link (rotation would delete what the link points at)."""
    checkpoints = Path(path) / CHECKPOINT_DIR
    steps = list(checkpoints.iterdir()) if checkpoints.is_dir() else []
    for entry in [Path(path) / name for name in _NO_LINKS] + steps:
        if entry.is_symlink():
            raise RunExistsError(
                f"{entry} is a symbolic link; moealign writes the entries of a run folder in "
                "place and would change what the link points at: replace the link by the "
                "file or folder itself"
            )


def run_identity(config: dict[str, Any]) -> str:
    """SHA-256 of the recorded config without what a resume may change (and the run's name):
    equal for a run and its resumption, different for another config or seed."""
    flat = flatten_config(config)
    kept = {k: v for k, v in flat.items() if k not in _RESUMABLE_CHANGES and k != "name"}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def check_same_config(path: str | Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    """RunExistsError naming every key in which ``new`` differs from the config ``old``
    recorded in run folder ``path``, beyond what a resume may change."""
    old_flat, new_flat = flatten_config(old), flatten_config(new)
    changed = sorted(
        key
        for key in old_flat.keys() | new_flat.keys()
        if old_flat.get(key) != new_flat.get(key) and key not in _RESUMABLE_CHANGES
    )
    if changed:
        details = ", ".join(f"{k}: {old_flat.get(k)!r} -> {new_flat.get(k)!r}" for k in changed)
        raise RunExistsError(
            f"cannot resume or reuse {path}: the config differs from the recorded one in "
            f"{details}; only {', '.join(sorted(_RESUMABLE_CHANGES))} may change"
        )


def finished_step(path: str | Path) -> int | None:
    """The step recorded in the run's ``final_eval.json`` (None if the run has not finished)."""
    file = Path(path) / FINAL_EVAL_FILE
    if not file.is_file():
        return None
    record = read_json(file)
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def read_run_config(path: str | Path) -> Any:
    """The :class:`moealign.config.RunConfig` recorded in a run folder's ``config.json``; one
    clear error (naming the file) if the folder holds no run or the file is corrupt."""
    from moealign.config import ConfigError, RunConfig, build_config

    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise RunExistsError(f"{path} is not a run directory: it has no {CONFIG_FILE}")
    data = read_json(file)
    if not isinstance(data, dict):
        raise RunExistsError(f"{file}: a JSON {type(data).__name__}; expected a config table")
    try:
        return build_config(RunConfig, data)
    except ConfigError as err:
        raise ConfigError("", f"{file}: {err}") from None


class RunLock:
    """An advisory ``flock`` on ``<folder>/.lock``, exclusive (writers: ``train``, ``eval``, the
    results folder of ``roma``) or shared (readers: the base run of ``roma``). The holder writes
    its pid into the file so that a refused process can name it; the kernel releases the lock
    when the holder exits, so a killed process leaves no stale lock. Within one process the
    lock is re-entrant (counted), so a library user may open the same folder twice."""

    _held: dict[str, tuple[int, int]] = {}  # real path → (fd, count) in this process

    def __init__(self, folder: str | Path, *, shared: bool = False) -> None:
        self.folder = Path(folder)
        self.shared = shared
        self._key: str | None = None

    def acquire(self) -> RunLock:
        import fcntl

        path = self.folder / LOCK_FILE
        key = os.path.realpath(path)
        if key in RunLock._held:
            fd, count = RunLock._held[key]
            RunLock._held[key] = (fd, count + 1)
            self._key = key
            return self
        if path.is_symlink() or not self.shared:  # a writer: nothing it writes is a link
            check_no_links(self.folder)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except PermissionError:
            if self.shared:  # a read-only folder: nobody here can write to it either
                return self
            raise
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise RunLockedError(
                f"{self.folder} is in use by process {holder} (it holds {path}); wait for it "
                "to finish or stop it, then try again"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        RunLock._held[key] = (fd, 1)
        self._key = key
        return self

    def release(self) -> None:
        if self._key is None:
            return
        fd, count = RunLock._held.pop(self._key)
        if count > 1:
            RunLock._held[self._key] = (fd, count - 1)
        else:
            os.close(fd)  # closing the last descriptor releases the flock
        self._key = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


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


def _check_folder(path: Path, what: str) -> None:
    """A folder path that is not a file (or under one) and can be written."""
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise RunExistsError(f"{what} {path}: {parent} exists and is not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise RunExistsError(f"{what} {path}: {parent} is not writable")
            return


class RunDirectory:
    """One run's directory; create it with :meth:`open`, release it with :meth:`close`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock: RunLock | None = None

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
        """Create (or, with ``resume``, reopen) the run directory, lock it, and record config
        and meta; stale ``.tmp-*`` entries are removed.

        Raises :class:`RunExistsError` if ``path`` holds a run and neither ``resume`` nor
        ``overwrite`` is set, if resuming with a config that differs in more than
        ``train.steps``, or if ``path`` is a file or a non-empty folder that is not a run
        (never written into, never deleted); :class:`RunLockedError` if another process holds
        it. ``overwrite`` replaces only a run folder, keeping the folder itself.
        """
        run = cls(Path(path))
        run.check(config, resume=resume, overwrite=overwrite)
        run.path.mkdir(parents=True, exist_ok=True)
        run.hold()
        try:
            run.check(config, resume=resume, overwrite=overwrite)  # again, now under the lock
            run._open_locked(config, seed=seed, device=device, overwrite=overwrite)
        except BaseException:
            run.close()
            raise
        return run

    def check(
        self, config: dict[str, Any], *, resume: bool = False, overwrite: bool = False
    ) -> None:
        """Raise what :meth:`open` would raise for this folder and ``config``, changing
        nothing (the CLI calls it before any work starts)."""
        if resume and overwrite:
            raise ValueError("resume and overwrite: got both; expected at most one of them")
        _check_folder(self.path, "run directory")
        if resume:
            self.check_resumable()
        if not self.path.exists():
            return
        check_no_links(self.path)
        if is_run_dir(self.path):
            if resume:
                check_same_config(
                    self.path, self._read_object(CONFIG_FILE, "the recorded config"), config
                )
                self._check_records()
            elif not overwrite:
                raise RunExistsError(
                    f"run directory {self.path} already holds a run; "
                    "pass --resume to continue it or --overwrite to replace it"
                )
        elif self._foreign_entries():
            raise RunExistsError(
                f"run directory {self.path} is not empty and holds no moealign run (no "
                f"{MARKER_FILE} marker nor the {META_FILE} moealign writes); refusing to write "
                "into it or replace it: choose a new or empty folder"
            )

    def check_resumable(self) -> None:
        """Raise :class:`RunExistsError` naming the folder unless it holds a run to resume."""
        if self.path.exists() and not self.path.is_dir():
            raise RunExistsError(f"cannot resume {self.path}: it is not a folder")
        if not self.path.is_dir():
            raise RunExistsError(
                f"cannot resume {self.path}: no such folder; give the folder of a run (or "
                "leave out --resume to start one)"
            )
        if not is_run_dir(self.path):
            raise RunExistsError(
                f"cannot resume {self.path}: it holds no moealign run (no {MARKER_FILE} marker "
                f"nor the {META_FILE} moealign writes); give the folder of a run"
            )

    def _read_object(self, name: str, what: str) -> dict[str, Any]:
        file = self.path / name
        data = read_json(file)
        if not isinstance(data, dict):
            raise RunExistsError(
                f"{file}: a JSON {type(data).__name__}; expected an object ({what})"
            )
        return data

    def _check_records(self) -> None:
        """Every record a resume reads or rewrites has the right type (nothing is written yet):
        ``meta.json`` an object, ``metrics.jsonl`` objects with an integer ``step``,
        ``final_eval.json`` (if any) an object whose ``step`` is an integer."""
        meta = self._read_object(META_FILE, "the run's provenance")
        if not isinstance(meta.get("resumed", []), list):
            raise RunExistsError(f"{self.path / META_FILE}: resumed is not a list")
        for number, record in iter_jsonl(self.metrics_path):
            step = record.get("step", 0)
            if not isinstance(step, int) or isinstance(step, bool):
                raise RunExistsError(
                    f"{self.metrics_path}:{number}: step {step!r} is not an integer"
                )
        if (self.path / FINAL_EVAL_FILE).exists():
            final = self._read_object(FINAL_EVAL_FILE, "the final evaluation")
            step = final.get("step", 0)
            if not isinstance(step, int) or isinstance(step, bool):
                raise RunExistsError(
                    f"{self.path / FINAL_EVAL_FILE}: step {step!r} is not an integer"
                )

    def _foreign_entries(self) -> list[str]:
        """Entries of the folder other than a lock file and temporaries."""
        return [
            entry.name
            for entry in self.path.iterdir()
            if entry.name != LOCK_FILE and not entry.name.startswith(TEMPORARY_PREFIX)
        ]

    def _open_locked(
        self, config: dict[str, Any], *, seed: int, device: str, overwrite: bool
    ) -> None:
        """After :meth:`check` passed under the lock: clear a run that ``overwrite`` replaces
        (its entries, not the folder), or continue one; record config and meta."""
        remove_temporaries(self.path)
        remove_temporaries(self.checkpoint_dir)
        existing = is_run_dir(self.path)
        if existing and overwrite:
            for name in self._foreign_entries():
                entry = self.path / name
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            existing = False
        self.checkpoint_dir.mkdir(exist_ok=True)
        if existing:
            meta = read_json(self.path / META_FILE)
            meta.setdefault("resumed", []).append({"time": utc_now(), "command": sys.argv})
        else:
            meta = {"seed": seed, "device": device, "start_time": utc_now(), **environment_info()}
        write_marker(self.path, "run")
        self.metrics_path.touch()
        atomic_write_json(self.path / CONFIG_FILE, config)
        atomic_write_json(self.path / META_FILE, meta)

    def hold(self) -> None:
        """Lock the run folder for this process (a no-op while it holds the lock)."""
        if self.lock is None:
            self.lock = RunLock(self.path).acquire()

    def close(self) -> None:
        """Release the run folder's lock."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / CHECKPOINT_DIR

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    def log_metrics(self, record: dict[str, Any]) -> None:
        """Append one JSON line to ``metrics.jsonl``, written whole and flushed
        (:func:`moealign.io.append_jsonl`)."""
        append_jsonl(self.metrics_path, record)

    def read_metrics(self) -> list[dict[str, Any]]:
        """The logged records; a torn final line is skipped with a warning."""
        return read_jsonl(self.metrics_path)

    def truncate_metrics(self, step: int) -> None:
        """Drop records after ``step`` (logged by an interrupted run past its last checkpoint)
        and a torn final line, so that a resumed run's ``metrics.jsonl`` matches an
        uninterrupted one. The file is rewritten atomically, and only if something is dropped."""
        if not self.metrics_path.exists():
            return
        records = self.read_metrics()
        kept = [r for r in records if r.get("step", 0) <= step]
        text = "".join(json.dumps(r) + "\n" for r in kept)
        if text != self.metrics_path.read_text(encoding="utf-8"):
            atomic_write_text(self.metrics_path, text)

    def write_final_eval(self, results: dict[str, Any]) -> None:
        atomic_write_json(self.path / FINAL_EVAL_FILE, results)

    def update_meta(self, **fields: Any) -> None:
        path = self.path / META_FILE
        meta = read_json(path)
        meta.update(fields)
        atomic_write_json(path, meta)
