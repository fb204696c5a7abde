"""Optional mirrors of the metrics log: TensorBoard and Weights & Biases (offline).

``metrics.jsonl`` in the run directory stays the source of truth (DESIGN.md §8); these loggers
copy each record to a dashboard. Switched on by ``train.tensorboard`` / ``train.wandb``:

* TensorBoard: ``torch.utils.tensorboard.SummaryWriter`` writing to ``<run_dir>/tensorboard``.
  A resumed run purges the events logged after its checkpoint step, as ``metrics.jsonl`` does.
* Weights & Biases: ``wandb.init(mode="offline", dir=<run_dir>)``, so the run lands in
  ``<run_dir>/wandb/offline-run-*`` with no network; ``wandb sync`` uploads it later. The
  ``WANDB_MODE`` environment variable, when set, overrides the mode.

A record ``{"step": s, "split": "val", "val_loss": x, "val_routing/max_vio": y}`` becomes the
scalars ``val/loss`` and ``val/routing/max_vio`` at step s (the split prefix of a key is not
repeated); non-numeric values (event descriptions) are skipped.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from moealign.config import ConfigError, TrainConfig

__all__ = [
    "LoggerGroup",
    "MetricLogger",
    "TensorBoardLogger",
    "WandbLogger",
    "build_loggers",
    "scalar_tags",
]


class MetricLogger(Protocol):
    """Receives every record that goes to ``metrics.jsonl``."""

    def log(self, record: Mapping[str, Any]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def scalar_tags(record: Mapping[str, Any]) -> tuple[int, dict[str, float]]:
    """(step, {tag: value}) for the numeric entries of a metrics record; see the module doc."""
    step = int(record["step"])
    split = str(record.get("split", "event"))
    scalars: dict[str, float] = {}
    for key, value in record.items():
        if key in ("step", "split") or isinstance(value, bool):
            continue
        if not isinstance(value, (int, float)):
            continue
        name = key[len(split) + 1 :] if key.startswith((f"{split}_", f"{split}/")) else key
        scalars[f"{split}/{name}"] = float(value)
    return step, scalars


class TensorBoardLogger:
    """Scalars to a TensorBoard event file in ``log_dir``."""

    def __init__(self, log_dir: Path, resume_step: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events at steps >= purge_step left by an interrupted run.
        self.writer = SummaryWriter(
            log_dir=str(log_dir), purge_step=resume_step + 1 if resume_step > 0 else None
        )

    def log(self, record: Mapping[str, Any]) -> None:
        step, scalars = scalar_tags(record)
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """Scalars to a Weights & Biases run, offline by default, stored under ``directory``."""

    def __init__(self, directory: Path, name: str, config: Mapping[str, Any]) -> None:
        import wandb

        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project="moealign",
            name=name,
            dir=str(directory),
            config=dict(config),
            mode=os.environ.get("WANDB_MODE", "offline"),
            reinit="create_new",
        )

    def log(self, record: Mapping[str, Any]) -> None:
        step, scalars = scalar_tags(record)
        # NaN/inf are kept: they mark where a run diverged.
        self.run.log(scalars, step=step)

    def flush(self) -> None:
        """W&B writes records as they arrive; nothing is buffered here."""

    def close(self) -> None:
        self.run.finish()


class LoggerGroup:
    """Fans each call out to every logger of the group (none: every call does nothing)."""

    def __init__(self, loggers: Sequence[MetricLogger] = ()) -> None:
        self.loggers = list(loggers)

    def log(self, record: Mapping[str, Any]) -> None:
        for logger in self.loggers:
            logger.log(record)

    def flush(self) -> None:
        for logger in self.loggers:
            logger.flush()

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
        self.loggers = []


def _require(package: str, switch: str) -> None:
    try:
        __import__(package)
    except ImportError:
        raise ConfigError(
            switch,
            f"got true, but the {package!r} package is not installed; "
            "install moealign[logging] or set it to false",
        ) from None


def build_loggers(
    train_config: TrainConfig,
    run_dir: Path,
    *,
    run_name: str,
    config: Mapping[str, Any],
    resume_step: int = 0,
) -> LoggerGroup:
    """The loggers switched on in ``train_config`` for the run in ``run_dir``.

    ``resume_step`` is the step a resumed run continues from (0 for a fresh run).
    """
    loggers: list[MetricLogger] = []
    if train_config.tensorboard:
        _require("tensorboard", "train.tensorboard")
        loggers.append(TensorBoardLogger(run_dir / "tensorboard", resume_step))
    if train_config.wandb:
        _require("wandb", "train.wandb")
        loggers.append(WandbLogger(run_dir, run_name, config))
    return LoggerGroup(loggers)
