"""Ablation studies: config variants × seeds, each cell a ``moealign train`` subprocess.

A study file (TOML; paths relative to it) names a base config and what varies (DESIGN.md §8,
guide Steps 4–5: baselines and ablations over seeds)::

    base = "../configs/tiny.toml"        # every cell starts from this run config
    seeds = [0, 1, 2]                    # each variant runs once per seed
    seed_keys = ["train.seed"]           # optional: the config keys that take the seed
    baseline = "router=softmax_topk"     # optional: the variant the others are compared with
    out_dir = "runs/router_study"        # optional (default runs/<study file stem>)

    [baselines]                          # optional: a variant's own baseline (else baseline)
    "router=mpi,lr=0.001" = "router=softmax_topk,lr=0.001"

    [overrides]                          # optional: fixed for every cell
    "train.steps" = 200

    [axes]                               # optional: the cartesian product of these values
    "model.router" = ["softmax_topk", "mpi"]

    [[variants]]                         # optional: named variants outside the grid
    name = "no_balance_loss"
    overrides = { "loss.balance_coef" = 0.0 }

Cells = (grid variants ∪ named variants) × seeds; without axes and variants, the base config is
the one variant ``base``. A grid variant is named after its values (``router=mpi,lr=0.001``,
keyed by the last part of the dotted key); a cell's run directory is
``<out_dir>/<variant>__seed<seed>``. Seeds come only from ``seeds``: an axis, variant or fixed
override of a ``seed_keys`` key is refused. Every cell's config is loaded and checked as
``moealign train`` would (:func:`moealign.training.preflight.check_before_training`) before
anything runs, also with ``--dry-run``.

Running: cells go seed by seed (all variants of seed 0 first), ``jobs`` at a time, each as
``python -m moealign.cli train --config BASE --set ... --out CELL_DIR`` with its output in
``<out_dir>/logs/<cell>.log``. A cell whose ``final_eval.json`` exists is skipped; a cell with
checkpoints but no final evaluation continues with ``--resume``. A cell's outcome is one of
``finished``, ``diverged`` (a non-finite training or validation loss; the first such step is
recorded), ``failed`` (the process exited with an error; the last line of its log is
recorded) or ``interrupted`` (stopped by a signal; rerun the study to continue). Each attempt
is appended to ``<out_dir>/cells.jsonl``; ``<out_dir>/study.json`` holds the expanded grid, the
study's ``status`` (``running``, ``interrupted`` or ``done``) and every cell's latest status,
rewritten as cells finish. Unless ``--quiet``, one line goes to stderr as each cell starts and as
it ends (status, wall time, final validation loss, and an estimate of the time left from the cells
finished so far). SIGINT/SIGTERM sent to ``ablate`` are forwarded to the running cells, which
checkpoint and stop; ``ablate`` waits for them, records the study as interrupted and exits with
130/143.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import moealign
from moealign import progress
from moealign.config import ConfigError, RunConfig, load_config, read_toml
from moealign.io import TEMPORARY_PREFIX, append_jsonl, atomic_write_json, read_json, read_jsonl
from moealign.tables import Table, format_number, to_text
from moealign.training.preflight import check_writable_folder
from moealign.training.runs import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    FINAL_EVAL_FILE,
    LOCK_FILE,
    MARKER_FILE,
    METRICS_FILE,
    RunLock,
    folder_kind,
    utc_now,
    write_marker,
)

__all__ = [
    "Cell",
    "CellResult",
    "AblationStudy",
    "classify_run",
    "expand_axes",
    "first_nonfinite_step",
    "StudyInterrupted",
    "cell_config",
    "check_cells",
    "load_study",
    "run_ablate",
    "run_study",
    "toml_literal",
]

STUDY_FILE = "study.json"
CELLS_LOG = "cells.jsonl"
_STUDY_KEYS = {
    "base",
    "seeds",
    "seed_keys",
    "baseline",
    "baselines",
    "out_dir",
    "overrides",
    "axes",
    "variants",
}
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=,+-]*$")


# ---------------------------------------------------------------------- study definition


def toml_literal(value: Any) -> str:
    """``value`` written as a TOML literal, so that ``--set key=<literal>`` reads it back.

    Strings use JSON escapes (a subset of TOML's basic-string escapes); floats keep their
    ``repr`` (``inf``/``nan`` as TOML spells them); lists become arrays and dicts inline tables.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    if isinstance(value, Mapping):
        items = (f"{json.dumps(str(k))} = {toml_literal(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    raise ValueError(
        f"value: got {value!r} of type {type(value).__name__}; expected a string, number, "
        "boolean, array or table"
    )


def _slug(value: Any) -> str:
    text = value if isinstance(value, str) else toml_literal(value).strip('"')
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text) or "empty"


def expand_axes(axes: Mapping[str, Sequence[Any]]) -> dict[str, dict[str, Any]]:
    """The cartesian product of ``axes`` (dotted key → values): variant name → overrides.

    A variant's name joins ``label=value`` over the axes in order; the label is the last part
    of the key, or the whole key where two axes share a last part.
    """
    if not axes:
        return {}
    last_parts = [key.rsplit(".", 1)[-1] for key in axes]
    labels = [
        last if last_parts.count(last) == 1 else key
        for key, last in zip(axes, last_parts, strict=True)
    ]
    variants: dict[str, dict[str, Any]] = {}
    for values in itertools.product(*axes.values()):
        name = ",".join(
            f"{label}={_slug(value)}" for label, value in zip(labels, values, strict=True)
        )
        if name in variants:
            raise ConfigError(
                "axes",
                f"two grid points share the directory name {name!r}; give the values distinct "
                "spellings or use named [[variants]]",
            )
        variants[name] = dict(zip(axes, values, strict=True))
    return variants


@dataclass(frozen=True)
class Cell:
    """One training run of a study: a variant at one seed."""

    name: str
    variant: str
    seed: int
    overrides: tuple[str, ...]
    run_dir: Path


@dataclass(frozen=True)
class AblationStudy:
    """An expanded, validated study; build it with :func:`load_study`."""

    name: str
    path: Path
    base_config: Path
    out_dir: Path
    seeds: tuple[int, ...]
    seed_keys: tuple[str, ...]
    variants: dict[str, dict[str, Any]]
    axes: dict[str, list[Any]]
    baseline: str | None
    cells: tuple[Cell, ...]
    baselines: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "study_file": str(self.path),
            "base_config": str(self.base_config),
            "out_dir": str(self.out_dir),
            "seeds": list(self.seeds),
            "seed_keys": list(self.seed_keys),
            "axes": self.axes,
            "variants": self.variants,
            "baseline": self.baseline,
            "baselines": self.baselines,
        }


def _expect(condition: bool, name: str, value: Any, accepted: str) -> None:
    if not condition:
        raise ConfigError(name, f"got {value!r}; expected {accepted}")


def _overrides_table(value: Any, name: str) -> dict[str, Any]:
    _expect(
        isinstance(value, dict) and all(isinstance(k, str) and k for k in value),
        name,
        value,
        'a table of dotted config keys to values, e.g. {"optim.lr" = 1e-3}',
    )
    return dict(value)


def _named_variants(entries: Any) -> dict[str, dict[str, Any]]:
    _expect(isinstance(entries, list), "variants", entries, "an array of tables [[variants]]")
    variants: dict[str, dict[str, Any]] = {}
    for index, entry in enumerate(entries):
        where = f"variants[{index}]"
        _expect(isinstance(entry, dict), where, entry, "a table with name and overrides")
        unknown = set(entry) - {"name", "overrides"}
        _expect(not unknown, where, sorted(unknown), "only the keys name and overrides")
        name = entry.get("name")
        _expect(
            isinstance(name, str) and bool(_NAME_PATTERN.match(name)),
            f"{where}.name",
            name,
            "a directory-safe name (letters, digits, . _ = , + -)",
        )
        _expect(name not in variants, f"{where}.name", name, "a name used by no other variant")
        variants[name] = _overrides_table(entry.get("overrides", {}), f"{where}.overrides")
    return variants


def _variant_baselines(value: Any, variants: Mapping[str, Any]) -> dict[str, str]:
    """``[baselines]``: variant → the variant it is compared with (instead of ``baseline``)."""
    _expect(isinstance(value, dict), "baselines", value, "a table of variant = baseline variant")
    for variant, baseline in value.items():
        names = sorted(variants)
        _expect(variant in variants, "baselines", variant, f"a variant name, one of {names}")
        _expect(
            isinstance(baseline, str) and baseline in variants and baseline != variant,
            f"baselines.{variant}",
            baseline,
            f"another variant, one of {names}",
        )
    return dict(value)


def _cell_overrides(
    fixed: Mapping[str, Any], variant: Mapping[str, Any], seed_keys: Sequence[str], seed: int
) -> tuple[str, ...]:
    values = {**fixed, **variant, **dict.fromkeys(seed_keys, seed)}
    return tuple(f"{key}={toml_literal(value)}" for key, value in values.items())


def _refuse_seed_keys(
    seed_keys: Sequence[str],
    axes: Mapping[str, Any],
    fixed: Mapping[str, Any],
    variants: Mapping[str, Mapping[str, Any]],
) -> None:
    """A seed key set anywhere but ``seeds`` would be silently overridden per cell: refuse it."""
    places = [(f"axes.{key}", key) for key in axes] + [(f"overrides.{key}", key) for key in fixed]
    places += [(f"variants.{name}.{key}", key) for name, table in variants.items() for key in table]
    for where, key in places:
        if key in seed_keys:
            raise ConfigError(
                where,
                f"sets {key!r}, which the study sets from `seeds` for every cell (seed_keys = "
                f"{list(seed_keys)}); list the seeds in `seeds` instead",
            )


def cell_config(base: Path, cell: Cell) -> RunConfig:
    """The run config of ``cell`` (as its ``moealign train`` will load it); a bad one raises
    :class:`ConfigError` naming the cell and the field."""
    try:
        return load_config(base, [*cell.overrides, f"name={toml_literal(cell.name)}"])
    except ConfigError as err:
        raise ConfigError("", f"study cell {cell.name!r}: {err}") from None


def check_cells(study: AblationStudy) -> None:
    """Check every cell as ``moealign train`` does before it starts (device, folders, data and
    prior files, memory); the first problem raises :class:`ConfigError` naming the cell."""
    from moealign.training.preflight import check_before_training

    for cell in study.cells:
        try:
            check_before_training(cell_config(study.base_config, cell), cell.run_dir)
        except ConfigError as err:
            raise ConfigError("", f"study cell {cell.name!r}: {err}") from None


def load_study(path: str | Path, out_dir: str | Path | None = None) -> AblationStudy:
    """Read, expand and validate a study file (see the module docstring).

    Every cell's config is built with :func:`moealign.config.load_config`; the first bad one
    raises :class:`ConfigError` naming the cell and the field.
    """
    path = Path(path).resolve()
    spec = read_toml(path, "study file")
    unknown = sorted(set(spec) - _STUDY_KEYS)
    _expect(not unknown, "study", unknown, f"only the keys {', '.join(sorted(_STUDY_KEYS))}")
    _expect("base" in spec, "base", None, "the path of the base config file")
    base = path.parent / spec["base"]
    _expect(base.is_file(), "base", spec["base"], "an existing config file (relative to study)")
    seeds = spec.get("seeds", [0])
    _expect(
        isinstance(seeds, list)
        and bool(seeds)
        and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
        and len(set(seeds)) == len(seeds),
        "seeds",
        seeds,
        "a non-empty array of distinct integers",
    )
    seed_keys = spec.get("seed_keys", ["train.seed"])
    _expect(
        isinstance(seed_keys, list) and all(isinstance(k, str) and k for k in seed_keys),
        "seed_keys",
        seed_keys,
        "an array of dotted config keys",
    )
    axes = spec.get("axes", {})
    _expect(isinstance(axes, dict), "axes", axes, "a table of dotted key = [values]")
    for key, values in axes.items():
        _expect(
            isinstance(values, list) and bool(values), f"axes.{key}", values, "a non-empty array"
        )
    variants = expand_axes(axes)
    for name, overrides in _named_variants(spec.get("variants", [])).items():
        _expect(name not in variants, "variants", name, "a name that no grid variant has")
        variants[name] = overrides
    if not variants:
        variants = {"base": {}}
    baseline = spec.get("baseline")
    _expect(
        baseline is None or baseline in variants,
        "baseline",
        baseline,
        f"one of the variants {sorted(variants)}",
    )
    baselines = _variant_baselines(spec.get("baselines", {}), variants)
    fixed = _overrides_table(spec.get("overrides", {}), "overrides")
    _refuse_seed_keys(seed_keys, axes, fixed, variants)
    root = out_dir if out_dir is not None else spec.get("out_dir", f"runs/{path.stem}")
    _expect(
        isinstance(root, (str, Path)) and str(root).strip() != "" and "\0" not in str(root),
        "out_dir",
        root,
        "a folder path (not empty)",
    )
    root = Path(root).resolve()
    cells = []
    for seed in seeds:
        for variant, overrides in variants.items():
            name = f"{variant}__seed{seed}"
            cell_overrides = _cell_overrides(fixed, overrides, seed_keys, seed)
            cell = Cell(name, variant, seed, cell_overrides, root / name)
            cell_config(base, cell)
            cells.append(cell)
    return AblationStudy(
        name=path.stem,
        path=path,
        base_config=base.resolve(),
        out_dir=root,
        seeds=tuple(seeds),
        seed_keys=tuple(seed_keys),
        variants=variants,
        axes=axes,
        baseline=baseline,
        cells=tuple(cells),
        baselines=baselines,
    )


# ---------------------------------------------------------------------- cell outcomes


def first_nonfinite_step(metrics: Sequence[Mapping[str, Any]]) -> int | None:
    """The first logged step at which the run diverged: a training ``loss`` or validation
    ``val_loss`` that is NaN/inf (strict JSON writes it as null and lists it under
    ``nonfinite``), or a ``nonfinite`` event that stopped training. A step that
    ``train.on_nonfinite = "skip"`` skipped (``step_skipped``) does not count."""
    for record in metrics:
        if record.get("event") == "nonfinite":
            if record.get("policy") == "stop":
                return int(record["step"])
            continue
        flagged = record.get("nonfinite") or ()
        for key in ("loss", "val_loss"):
            value = record.get(key)
            if key == "loss" and record.get("step_skipped"):
                continue
            if key in flagged or (isinstance(value, (int, float)) and not math.isfinite(value)):
                return int(record["step"])
    return None


PARENT_PID_ENV = "MOEALIGN_PARENT_PID"


def stop_with_parent() -> None:
    """In a cell's ``train`` process (``MOEALIGN_PARENT_PID`` set by ablate): ask Linux to send
    it SIGTERM when the ablate process dies, even by kill -9 (``prctl(PR_SET_PDEATHSIG)``), so
    the cell saves a checkpoint and stops instead of training on as an orphan that holds its
    run's lock; stop at once if the parent is already gone. A no-op elsewhere."""
    parent = os.environ.get(PARENT_PID_ENV, "")
    if not parent.isdigit() or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != int(parent):  # died before prctl: nobody will signal us
        os.kill(os.getpid(), signal.SIGTERM)


# Exit statuses of a cell stopped by a signal: 130/143 after checkpointing (moealign.cli), or
# killed by it (a negative status from subprocess).
_SIGNAL_STATUSES = {130, 143, -signal.SIGINT, -signal.SIGTERM, -signal.SIGKILL}


def classify_run(run_dir: Path, returncode: int | None = None) -> tuple[str, int | None]:
    """(status, first non-finite step) of a run directory after its process ended.

    ``returncode`` None means the process is not known (a run found on disk). Status:
    ``diverged`` if a loss went non-finite, else ``finished`` with a final evaluation,
    ``interrupted`` when stopped by a signal (or unknown), ``failed`` with another non-zero exit.
    """
    diverged_step = first_nonfinite_step(read_jsonl(run_dir / METRICS_FILE))
    if diverged_step is not None:
        return "diverged", diverged_step
    if (run_dir / FINAL_EVAL_FILE).exists():
        return "finished", None
    if returncode and returncode not in _SIGNAL_STATUSES:
        return "failed", None
    return "interrupted", None


@dataclass
class CellResult:
    """A cell's latest outcome, as recorded in ``study.json`` and ``cells.jsonl``."""

    cell: str
    variant: str
    seed: int
    run_dir: str
    log: str
    status: str = "pending"
    diverged_step: int | None = None
    returncode: int | None = None
    error: str = ""
    wall_s: float | None = None
    command: list[str] = field(default_factory=list)
    finished_at: str = ""


def _last_log_line(log: Path) -> str:
    if not log.exists():
        return ""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    lines = [line for line in lines if line]
    return lines[-1] if lines else ""


def _duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _final_val_loss(run_dir: Path) -> float | None:
    try:
        final = read_json(run_dir / FINAL_EVAL_FILE)
    except (OSError, ValueError):  # not there yet, or unreadable: no loss to show
        return None
    value = final.get("val_loss") if isinstance(final, dict) else None
    return value if isinstance(value, (int, float)) else None


class _Progress:
    """One line per cell as it starts and as it ends, with the time left estimated as the
    mean wall time of the cells finished in this invocation × the cells not yet ended / jobs."""

    def __init__(self, total: int, jobs: int, write: Callable[[str], None]) -> None:
        self.total, self.jobs, self.write = total, jobs, write
        self.started = 0
        self.wall_times: list[float] = []
        self.lock = threading.Lock()

    def start(self, cell: Cell) -> None:
        with self.lock:
            self.started += 1
            self.write(f"[{self.started}/{self.total}] start {cell.name}")

    def end(self, result: CellResult) -> None:
        with self.lock:
            self.wall_times.append(result.wall_s or 0.0)
            ended, left = len(self.wall_times), self.total - len(self.wall_times)
            status = _status_text(result)
            loss = _final_val_loss(Path(result.run_dir))
            line = f"[{ended}/{self.total}] end   {result.cell} after "
            line += f"{_duration(result.wall_s or 0.0)}: {status}"
            line += f", val loss {format_number(loss)}" if loss is not None else ""
            if left:
                mean = sum(self.wall_times) / ended
                line += f"; {left} left, ETA {_duration(mean * math.ceil(left / self.jobs))}"
            self.write(line)


class _StudyRunner:
    """Runs the cells of a study and keeps ``study.json`` / ``cells.jsonl`` up to date."""

    def __init__(
        self, study: AblationStudy, jobs: int, progress: Callable[[str], None] | None = None
    ) -> None:
        self.study = study
        self.jobs = jobs
        self.write_progress = progress
        self.progress: _Progress | None = None
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.stop_signal: str | None = None
        self.status = "running"
        self.processes: set[subprocess.Popen] = set()
        self.log_dir = study.out_dir / "logs"
        self.results = {
            cell.name: CellResult(
                cell=cell.name,
                variant=cell.variant,
                seed=cell.seed,
                run_dir=str(cell.run_dir),
                log=str(self.log_dir / f"{cell.name}.log"),
            )
            for cell in study.cells
        }

    def command(self, cell: Cell) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "moealign.cli",
            "train",
            "--config",
            str(self.study.base_config),
        ]
        for override in (*cell.overrides, f"name={toml_literal(cell.name)}"):
            cmd += ["--set", override]
        cmd += ["--out", str(cell.run_dir), "--no-progress"]
        has_checkpoint = any((cell.run_dir / CHECKPOINT_DIR).glob("step_*"))
        if (cell.run_dir / CONFIG_FILE).exists():
            # Continue from the last checkpoint; without one, start the cell afresh.
            cmd.append("--resume" if has_checkpoint else "--overwrite")
        return cmd

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env[PARENT_PID_ENV] = str(os.getpid())  # the cell stops when this process dies
        # The child imports the same moealign sources as this process.
        source_root = str(Path(moealign.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [source_root, env.get("PYTHONPATH")]))
        if self.jobs > 1 and "OMP_NUM_THREADS" not in env:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.jobs))
        return env

    def write_study(self) -> None:
        data = {
            **self.study.to_dict(),
            "status": self.status,
            "updated": utc_now(),
            "cells": [asdict(result) for result in self.results.values()],
        }
        atomic_write_json(self.study.out_dir / STUDY_FILE, data, sort_keys=False)

    def record(self, result: CellResult) -> None:
        with self.lock:
            append_jsonl(self.study.out_dir / CELLS_LOG, asdict(result))
            self.write_study()

    def run_cell(self, cell: Cell) -> None:
        result = self.results[cell.name]
        log = Path(result.log)
        start = time.perf_counter()
        with open(log, "a") as handle:
            with self.lock:  # no cell starts after an interrupt has been forwarded
                if self.stop.is_set():
                    return
                result.command = self.command(cell)
                result.status = "running"
                self.write_study()
                if self.progress:
                    self.progress.start(cell)
                handle.write(f"# {utc_now()} {' '.join(result.command)}\n")
                handle.flush()
                process = subprocess.Popen(
                    result.command, stdout=handle, stderr=subprocess.STDOUT, env=self.environment()
                )
                self.processes.add(process)
            returncode = process.wait()
            with self.lock:
                self.processes.discard(process)
        result.returncode = returncode
        result.wall_s = time.perf_counter() - start
        result.status, result.diverged_step = classify_run(cell.run_dir, returncode)
        result.error = _last_log_line(log) if returncode else ""
        result.finished_at = utc_now()
        self.record(result)
        if self.progress:
            self.progress.end(result)

    def interrupt(self, signum: int = signal.SIGINT) -> None:
        """Stop scheduling cells and forward ``signum`` to the running ones, which checkpoint
        and stop; :meth:`run` then waits for them."""
        self.stop.set()
        self.stop_signal = signal.Signals(signum).name
        with self.lock:
            for process in self.processes:
                if process.poll() is None:
                    process.send_signal(signum)

    @contextmanager
    def _forward_signals(self) -> Iterator[None]:
        """While the cells run, SIGINT/SIGTERM to this process go to :meth:`interrupt`."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {
            sig: signal.signal(sig, lambda signum, frame: self.interrupt(signum))
            for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def run(self) -> list[CellResult]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        todo = []
        for cell in self.study.cells:
            if (cell.run_dir / FINAL_EVAL_FILE).exists():
                result = self.results[cell.name]
                result.status, result.diverged_step = classify_run(cell.run_dir)
            else:
                todo.append(cell)
        self.write_study()
        if self.write_progress is not None:
            self.progress = _Progress(len(todo), self.jobs, self.write_progress)
            done = len(self.study.cells) - len(todo)
            if done:
                total = len(self.study.cells)
                self.write_progress(f"{done} of {total} cells already finished; {len(todo)} to run")
        try:
            with self._forward_signals(), ThreadPoolExecutor(max_workers=self.jobs) as pool:
                futures = [pool.submit(self.run_cell, cell) for cell in todo]
                for future in as_completed(futures):
                    future.result()
        finally:
            with self.lock:
                self.status = "interrupted" if self.stop.is_set() else "done"
                self.write_study()
        return list(self.results.values())


class StudyInterrupted(Exception):
    """A study stopped by a signal (``signal``: ``"SIGINT"``/``"SIGTERM"``), with every cell's
    result so far."""

    def __init__(self, signal_name: str, results: list[CellResult]) -> None:
        super().__init__(f"study interrupted by {signal_name}")
        self.signal, self.results = signal_name, results


def check_study_folder(study: AblationStudy) -> None:
    """The study's ``out_dir`` may be written (the writers' guard,
    :func:`moealign.training.preflight.check_writable_folder`), and is new, empty or this
    study's folder: one whose ``study.json`` names another study, or that holds other files,
    is refused (ConfigError naming ``out_dir``)."""
    out = study.out_dir
    check_writable_folder(out, "out_dir", writes="study")
    if not out.is_dir():
        return
    file = out / STUDY_FILE
    if file.exists():
        try:
            recorded = read_json(file)
        except (OSError, ValueError) as err:
            raise ConfigError("out_dir", f"{file} cannot be read: {err}") from None
        name = recorded.get("name") if isinstance(recorded, dict) else None
        if name != study.name:
            raise ConfigError(
                "out_dir",
                f"got {str(out)!r}, which holds the study {name!r}, not {study.name!r}; choose "
                "another folder (a study folder holds one study)",
            )
    elif folder_kind(out) != "study":
        own = {MARKER_FILE, LOCK_FILE, CELLS_LOG, "logs", *(cell.name for cell in study.cells)}
        foreign = [
            p.name
            for p in out.iterdir()
            if p.name not in own and not p.name.startswith(TEMPORARY_PREFIX)
        ]
        if foreign:
            raise ConfigError(
                "out_dir",
                f"got {str(out)!r}, which is not empty and holds no study ({foreign[0]}, ...); "
                "choose a new or empty folder",
            )


def run_study(
    study: AblationStudy, jobs: int = 1, progress: Callable[[str], None] | None = None
) -> list[CellResult]:
    """Run every unfinished cell of ``study``, ``jobs`` at a time; returns every cell's result.

    A cell that diverges or fails is recorded with its status and error; the study goes on.
    ``progress`` (e.g. ``print``) receives a line as each cell starts and ends. A SIGINT/SIGTERM
    stops it (see the module docstring): the cells then read ``interrupted`` (or ``pending``)
    and :class:`StudyInterrupted` is raised.
    """
    if jobs < 1:
        raise ValueError(f"jobs: got {jobs}; expected an integer >= 1")
    check_study_folder(study)
    study.out_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(study.out_dir):  # one ablate per study folder: another is refused
        check_study_folder(study)
        write_marker(study.out_dir, "study")
        runner = _StudyRunner(study, jobs, progress)
        results = runner.run()
    if runner.stop_signal is not None:
        raise StudyInterrupted(runner.stop_signal, results)
    return results


# ---------------------------------------------------------------------- command line


def _status_text(result: CellResult) -> str:
    if result.status == "diverged":
        return f"diverged at step {result.diverged_step}"
    if result.status in ("failed", "interrupted") and result.error:
        return f"{result.status}: {result.error}"
    return result.status


def run_ablate(args: argparse.Namespace) -> int:
    """``moealign ablate``: 0 when every cell finished or diverged, 1 otherwise; 130/143 when
    stopped by SIGINT/SIGTERM."""
    study = load_study(args.study, args.out)
    if args.jobs < 1:
        raise ConfigError("--jobs", f"got {args.jobs}; expected an integer >= 1")
    check_study_folder(study)
    check_cells(study)
    print(f"study {study.name}: {len(study.cells)} cells in {study.out_dir}")
    if args.dry_run:
        for cell in study.cells:
            print(f"  {cell.name}: {' '.join(cell.overrides) or '(base config)'}")
        return 0
    try:
        results = run_study(study, args.jobs, progress.write)  # silent with --quiet
    except StudyInterrupted as stopped:
        print(
            f"error: interrupted by {stopped.signal}; the running cells saved a checkpoint: run "
            "the same command again to resume",
            file=sys.stderr,
        )
        return {"SIGINT": 130, "SIGTERM": 143}[stopped.signal]
    rows = [[result.cell, _status_text(result)] for result in results]
    print(to_text(Table([], rows), indent="  "))
    print(f"results: {study.out_dir / STUDY_FILE}; report: moealign report {study.out_dir}")
    return 0 if all(r.status in ("finished", "diverged") for r in results) else 1
