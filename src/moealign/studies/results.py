"""Reading finished runs back: run and study directories, per-run results, efficiency signals.

A *run* is a run directory (DESIGN.md §8: config.json, meta.json, metrics.jsonl,
final_eval.json); a *study* is a directory written by ``moealign ablate`` (study.json naming its
cells). Runs are grouped into *variants* (the same config over several seeds): a study's cells
by their variant, a loose run directory as a variant of its own named after the directory.

Per-run results (:func:`run_results`) are the scalars of ``final_eval.json`` plus:

* ``task_accuracy/<seen|heldout>/<task>`` and ``.../mean`` from ``final_eval["task_accuracy"]``
  = ``{"seen": {task: accuracy}, "heldout": {task: accuracy}}`` (fractions in [0, 1]);
* ``tokens_per_s``: mean over the logged training windows; ``train_time_s``: the training clock
  (:func:`training_clock`) at the last step; ``wall_time_s``: ``end_time − start_time`` in
  meta.json; ``peak_memory_mib``: ``peak_memory_bytes`` / 2²⁰; ``tokens_seen``;
* ``train_mean/<key>`` for each key of ``TRAIN_MEAN_METRICS``: the mean over the logged training
  records (``train_mean/routing/max_vio`` is MaxVio_batch over training, DESIGN.md §4);
* ``step0/<key>`` and ``change_from_step0/<key>`` = final − step 0 for each layer-mean routing
  statistic ``val_routing/<name>`` of the validation record at step 0 (the model as
  initialised), so that a training effect is read apart from what a metric gives untrained
  (e.g. λ of an MPI router, raised by its power step at initialisation already).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from moealign.io import iter_jsonl, read_json
from moealign.studies.ablate import STUDY_FILE, classify_run
from moealign.training.runs import CONFIG_FILE, FINAL_EVAL_FILE, META_FILE, METRICS_FILE

__all__ = [
    "RunDataError",
    "RunRecord",
    "RunSet",
    "TRAIN_MEAN_METRICS",
    "load_run",
    "load_runs",
    "run_results",
    "steps_to_reference_loss",
    "time_to_target",
    "training_clock",
]

TASK_SPLITS = ("seen", "heldout")
# Training-record metrics that run_results averages over the logged steps.
TRAIN_MEAN_METRICS = ("routing/max_vio", "balance_loss", "z_loss")


class RunDataError(ValueError):
    """A path that holds neither a run nor a study, or a run file that cannot be read."""


def _read_table(path: Path) -> dict[str, Any]:
    """The JSON object in ``path`` ({} if it does not exist); RunDataError naming the file."""
    if not path.exists():
        return {}
    data = read_json(path)
    if not isinstance(data, dict):
        raise RunDataError(f"{path}: a JSON {type(data).__name__}; expected an object")
    return data


def printable(text: str) -> str:
    """``text`` as valid UTF-8 for tables, plots and documents: bytes of a file name that are
    not UTF-8 (held as surrogates by Python) become U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _check_numbers(record: dict[str, Any], structured: set[str], where: str) -> None:
    """Every value of ``record`` but the ``structured`` keys is a number, string, bool or null
    (what a report reads as a metric); RunDataError naming ``where`` and the key."""
    for key, value in record.items():
        if key not in structured and isinstance(value, (list, dict)):
            raise RunDataError(
                f"{where}: {key} is a JSON {'array' if isinstance(value, list) else 'object'}; "
                "expected a number"
            )


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``, each with an integer ``step`` and scalar metrics (an
    ``event`` record may hold lists); RunDataError naming the file and line."""
    if not path.exists():
        return []
    records = []
    for number, record in iter_jsonl(path):
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise RunDataError(f"{path}:{number}: step {step!r} is not an integer")
        if "event" not in record:
            _check_numbers(record, set(), f"{path}:{number}")
        records.append(record)
    return records


@dataclass
class RunRecord:
    """One run directory's files; missing files read as empty."""

    path: Path
    variant: str
    seed: int
    status: str
    diverged_step: int | None = None
    error: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    final_eval: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return printable(self.path.name)

    def records(self, split: str) -> list[dict[str, Any]]:
        """Logged records of ``split`` (``train``/``val``), sorted by step."""
        return sorted((r for r in self.metrics if r.get("split") == split), key=lambda r: r["step"])


@dataclass
class RunSet:
    """Runs to report on, in order; ``baseline`` is the study's baseline variant (if any) and
    ``baselines`` the study's per-variant baselines (variant → the variant it is compared
    with, in place of ``baseline``)."""

    runs: list[RunRecord]
    baseline: str | None = None
    baselines: dict[str, str] = field(default_factory=dict)

    def baseline_of(self, variant: str, default: str | None = None) -> str | None:
        """The variant ``variant`` is compared with: its own baseline, else ``default``."""
        return self.baselines.get(variant, default)

    @property
    def variants(self) -> list[str]:
        return list(dict.fromkeys(run.variant for run in self.runs))

    def of_variant(self, variant: str, status: str | None = "finished") -> list[RunRecord]:
        """Runs of ``variant`` (with ``status``; None = any), in seed order."""
        return sorted(
            (
                r
                for r in self.runs
                if r.variant == variant and (status is None or r.status == status)
            ),
            key=lambda r: r.seed,
        )


def load_run(
    path: str | Path,
    variant: str | None = None,
    seed: int | None = None,
    status: str | None = None,
    error: str = "",
) -> RunRecord:
    """Read a run directory. A study's ``status`` is kept where it says the run did not end
    (``failed``, ``interrupted``, ``pending``); otherwise the files decide
    (:func:`moealign.studies.ablate.classify_run`)."""
    path = Path(path)
    config = _read_table(path / CONFIG_FILE)
    meta = _read_table(path / META_FILE)
    metrics = _read_metrics(path / METRICS_FILE)
    final = _read_table(path / FINAL_EVAL_FILE)
    _check_numbers(final, {"expert_counts", "task_accuracy", "tasks"}, str(path / FINAL_EVAL_FILE))
    found_status, diverged_step = classify_run(path)
    if seed is None:
        train = config.get("train")
        seed = meta.get("seed", train.get("seed", 0) if isinstance(train, dict) else 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise RunDataError(f"{path / META_FILE}: seed {seed!r} is not an integer")
    return RunRecord(
        path=path,
        variant=printable(variant or path.name),
        seed=seed,
        status=status if status in ("failed", "interrupted", "pending") else found_status,
        diverged_step=diverged_step,
        error=error,
        config=config,
        meta=meta,
        metrics=metrics,
        final_eval=final,
    )


def _study_cells(study: dict[str, Any], file: Path) -> list[dict[str, Any]]:
    cells = study.get("cells", [])
    fields = {"run_dir": str, "variant": str, "seed": int}
    if not isinstance(cells, list) or not all(
        isinstance(cell, dict)
        and all(isinstance(cell.get(key), kind) for key, kind in fields.items())
        for cell in cells
    ):
        raise RunDataError(
            f"{file}: cells must be a list of objects with run_dir, variant (strings) and seed "
            "(an integer)"
        )
    return cells


def _load_study(path: Path) -> RunSet:
    file = path / STUDY_FILE
    study = _read_table(file)
    runs = []
    for cell in _study_cells(study, file):
        status = cell.get("status")
        # A cell left "running" by a killed study is judged from its files.
        runs.append(
            load_run(
                cell["run_dir"],
                variant=cell["variant"],
                seed=cell["seed"],
                status=None if status in ("running", "finished", "diverged") else status,
                error=cell.get("error", ""),
            )
        )
    return RunSet(runs, study.get("baseline"), dict(study.get("baselines") or {}))


def load_runs(paths: Iterable[str | Path]) -> RunSet:
    """Runs of the given run and study directories (a study's baseline is kept)."""
    runs: list[RunRecord] = []
    baseline = None
    baselines: dict[str, str] = {}
    for path in map(Path, paths):
        if (path / STUDY_FILE).exists():
            study = _load_study(path)
            runs += study.runs
            baseline = baseline or study.baseline
            baselines = {**study.baselines, **baselines}
        elif (path / CONFIG_FILE).exists():
            runs.append(load_run(path))
        else:
            raise RunDataError(
                f"{path}: expected a run directory (with {CONFIG_FILE}) or a study directory "
                f"(with {STUDY_FILE})"
            )
    if not runs:
        raise RunDataError("no runs found in the given directories")
    return RunSet(runs, baseline, baselines)


def _finite_mean(values: Sequence[float]) -> float:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def training_clock(run: RunRecord) -> tuple[np.ndarray, np.ndarray]:
    """(steps, seconds) of training time elapsed at each logged training step, from (0, 0).

    Each log window took (tokens_seen − previous tokens_seen) / tokens_per_s seconds.
    """
    steps, seconds = [0], [0.0]
    previous_tokens = 0.0
    for record in run.records("train"):
        rate, tokens = record.get("tokens_per_s"), record.get("tokens_seen")
        if not (isinstance(rate, (int, float)) and isinstance(tokens, (int, float)) and rate > 0):
            continue
        steps.append(int(record["step"]))
        seconds.append(seconds[-1] + (tokens - previous_tokens) / rate)
        previous_tokens = tokens
    return np.asarray(steps), np.asarray(seconds)


def time_to_target(run: RunRecord, target_loss: float) -> tuple[int, float] | None:
    """(first step whose validation loss ≤ target, training seconds to it), or None."""
    steps, seconds = training_clock(run)
    for record in run.records("val"):
        loss = record.get("val_loss")
        if isinstance(loss, (int, float)) and math.isfinite(loss) and loss <= target_loss:
            step = int(record["step"])
            return step, float(np.interp(step, steps, seconds)) if len(steps) > 1 else math.nan
    return None


def steps_to_reference_loss(
    run_set: RunSet, variant: str, reference: str
) -> tuple[float, dict[int, int | None]]:
    """Steps each seed of ``variant`` needs to reach ``reference``'s final validation loss.

    The target is the mean final ``val_loss`` over the reference variant's finished seeds (the
    report's default target, but per pair of variants, e.g. each MPI cell against the softmax
    cell of the same optimizer). Returns (target, {seed: first evaluated step with val_loss ≤
    target, or None if never reached}) over ``variant``'s finished seeds.
    """
    losses = [run.final_eval.get("val_loss") for run in run_set.of_variant(reference)]
    finite = [v for v in losses if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        raise RunDataError(f"reference variant {reference!r} has no finished run with a val_loss")
    target = float(np.mean(finite))
    steps = {}
    for run in run_set.of_variant(variant):
        reached = time_to_target(run, target)
        steps[run.seed] = reached[0] if reached else None
    return target, steps


def _wall_time(meta: dict[str, Any]) -> float:
    try:
        start = datetime.fromisoformat(meta["start_time"])
        end = datetime.fromisoformat(meta["end_time"])
    except (KeyError, TypeError, ValueError):
        return math.nan
    return (end - start).total_seconds()


def _change_from_step0(run: RunRecord, final: dict[str, float]) -> dict[str, float]:
    """``step0/<key>`` and ``change_from_step0/<key>`` for the layer-mean routing statistics
    of the step-0 validation record that the final evaluation also holds."""
    initial = next((r for r in run.records("val") if r["step"] == 0), {})
    results = {}
    for key, value in initial.items():
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if key.startswith("val_routing/") and key.count("/") == 1 and numeric and key in final:
            results[f"step0/{key}"] = float(value)
            results[f"change_from_step0/{key}"] = final[key] - float(value)
    return results


def run_results(run: RunRecord) -> dict[str, float]:
    """Scalar results of a run: see the module docstring."""
    results = {
        key: float(value)
        for key, value in run.final_eval.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }
    accuracy = run.final_eval.get("task_accuracy")
    if isinstance(accuracy, dict):
        for split in TASK_SPLITS:
            per_task = accuracy.get(split) or {}
            for task, value in per_task.items():
                results[f"task_accuracy/{split}/{task}"] = float(value)
            if per_task:
                results[f"task_accuracy/{split}/mean"] = _finite_mean(list(per_task.values()))
    train = run.records("train")
    if train:
        results["tokens_per_s"] = _finite_mean([r.get("tokens_per_s", math.nan) for r in train])
        results["tokens_seen"] = float(train[-1].get("tokens_seen", math.nan))
        results["train_time_s"] = float(training_clock(run)[1][-1])
        for key in TRAIN_MEAN_METRICS:
            results[f"train_mean/{key}"] = _finite_mean([r.get(key, math.nan) for r in train])
    results |= _change_from_step0(run, results)
    results["wall_time_s"] = _wall_time(run.meta)
    if "peak_memory_bytes" in run.final_eval:
        results["peak_memory_mib"] = float(run.final_eval["peak_memory_bytes"]) / 2**20
    return {key: value for key, value in results.items() if not math.isnan(value)}
