"""What happens around a training step: a typed callback protocol and the built-in callbacks.

The trainer (:mod:`moealign.training.trainer`) calls every callback of ``trainer.callbacks``,
in order, at these points:

* ``on_train_start(trainer)``: once per :meth:`Trainer.train` call, before its first step;
* ``on_optimizer_step(trainer, applied)``: inside every step, on every rank, right after the
  optimizer step (``applied``) or its skip (a non-finite step), before the step's statistics;
* ``on_step_end(trainer, step)``: after each step (:class:`StepResult`), on every rank;
* ``on_evaluation(trainer, evaluation)``: after each validation evaluation, on every rank;
* ``on_log(trainer, record)``: for each record written to ``metrics.jsonl`` (rank 0);
* ``on_train_end(trainer, result)``: once when :meth:`Trainer.train` ends;
* ``on_close(trainer)``: from :meth:`Trainer.close`.

:func:`default_callbacks` gives the built-ins in the order that keeps a step's files consistent
(the checkpoint of step t holds the guardrail state after step t): expert-bias update, training
log, progress bar, periodic evaluation, guardrails, the final evaluation, the caller's
callbacks, checkpointing and the TensorBoard/W&B mirrors.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from moealign.evaluation.common import strict_json
from moealign.evaluation.lm import LMEvaluation
from moealign.evaluation.routing_stats import RoutingSummary
from moealign.evaluation.run import evaluation_record
from moealign.nn import update_expert_biases
from moealign.progress import Phase
from moealign.training.loggers import LoggerGroup, build_loggers
from moealign.training.runs import peak_memory_bytes, utc_now

if TYPE_CHECKING:
    from moealign.training.trainer import Trainer

__all__ = [
    "Callback",
    "Checkpointing",
    "ExpertBiasUpdate",
    "FinalEvaluation",
    "Guardrail",
    "MirrorLoggers",
    "PeriodicEvaluation",
    "ProgressBar",
    "StepResult",
    "TrainLogging",
    "TrainResult",
    "default_callbacks",
]


@dataclass
class StepResult:
    """One finished optimizer step: ``step`` (steps taken, this one included), its rank-reduced
    ``metrics``, its typed ``routing`` statistics (None without MoE layers), the global batch's
    ``tokens``, and the names of its non-finite values (``nonfinite``; empty when healthy; a
    step with any was not applied)."""

    step: int
    metrics: dict[str, float]
    routing: RoutingSummary | None
    tokens: int
    nonfinite: list[str] = field(default_factory=list)

    @property
    def applied(self) -> bool:
        return not self.nonfinite


@dataclass
class TrainResult:
    """What :meth:`Trainer.train` returns. ``final_eval`` is empty if the run was interrupted
    (a signal, ``stop_at``) or diverged (``diverged_at``: the step with a non-finite loss or
    gradient that stopped it, ``train.on_nonfinite = "stop"``); ``stop_signal`` names the
    signal that interrupted it (``"SIGINT"``/``"SIGTERM"``)."""

    step: int
    interrupted: bool
    run_dir: Path | None
    last_train: dict[str, float] = field(default_factory=dict)
    final_eval: dict[str, Any] = field(default_factory=dict)
    diverged_at: int | None = None
    stop_signal: str | None = None


class Callback(Protocol):
    """Hooks around the training loop (module docstring); subclass it for no-op defaults."""

    def on_train_start(self, trainer: Trainer) -> None: ...

    def on_optimizer_step(self, trainer: Trainer, applied: bool) -> None: ...

    def on_step_end(self, trainer: Trainer, step: StepResult) -> None: ...

    def on_evaluation(self, trainer: Trainer, evaluation: LMEvaluation) -> None: ...

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None: ...

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None: ...

    def on_close(self, trainer: Trainer) -> None: ...


class ExpertBiasUpdate(Callback):
    """The aux-loss-free expert-bias update after each optimizer step (DESIGN.md §2; counts
    all-reduced over ranks in :meth:`Router.update_expert_bias`); a skipped step's counts are
    dropped."""

    def on_optimizer_step(self, trainer: Trainer, applied: bool) -> None:
        update_expert_biases(trainer.model, applied)


class TrainLogging(Callback):
    """Every ``train.log_every`` steps (and the last) a ``split: "train"`` record: the step's
    metrics, ``tokens_per_s`` over the steps since the last record and ``tokens_seen``; the
    record of a skipped step says ``step_skipped``."""

    def __init__(self, log_every: int, steps: int):
        self.log_every, self.steps = log_every, steps
        self._start, self._tokens = time.perf_counter(), 0

    def on_train_start(self, trainer: Trainer) -> None:
        self._start, self._tokens = time.perf_counter(), 0

    def on_step_end(self, trainer: Trainer, step: StepResult) -> None:
        self._tokens += step.tokens
        if step.step % self.log_every and step.step != self.steps:
            return
        elapsed = time.perf_counter() - self._start
        metrics = step.metrics | {
            "tokens_per_s": self._tokens / max(elapsed, 1e-9),
            "tokens_seen": trainer.tokens_seen,
        }
        if not step.applied:
            metrics["step_skipped"] = True
        trainer.last_train = metrics
        trainer.log({"step": step.step, "split": "train", **metrics})
        self._start, self._tokens = time.perf_counter(), 0


class ProgressBar(Callback):
    """The "train" phase of :mod:`moealign.progress` over the steps (rank 0, unless disabled),
    showing the logged loss and rate: a bar on a terminal, a line every tenth otherwise."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.bar: Phase | None = None

    def on_train_start(self, trainer: Trainer) -> None:
        if self.enabled:
            self.bar = Phase("train: steps", self.total, initial=trainer.step)

    def on_step_end(self, trainer: Trainer, step: StepResult) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        loss, rate = record.get("loss"), record.get("tokens_per_s")
        if self.bar is not None and record.get("split") == "train" and None not in (loss, rate):
            self.bar.postfix(loss=f"{loss:.3f}", tok_s=f"{rate:.0f}")

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        self.on_close(trainer)

    def on_close(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class PeriodicEvaluation(Callback):
    """A validation record at step 0 (before the first step, so that every statistic, λ
    included, has its starting value) and every ``train.eval_every`` steps before the last
    (the final evaluation covers the last)."""

    def __init__(self, eval_every: int, steps: int):
        self.eval_every, self.steps = eval_every, steps

    def on_train_start(self, trainer: Trainer) -> None:
        if trainer.step == 0:
            trainer.log({"step": 0, "split": "val", **trainer.evaluate()})

    def on_step_end(self, trainer: Trainer, step: StepResult) -> None:
        if self.eval_every and step.step % self.eval_every == 0 and step.step < self.steps:
            trainer.log({"step": step.step, "split": "val", **trainer.evaluate()})


class Guardrail(Callback):
    """Runs ``trainer.guardrail`` on each applied step's routing statistics; logs and prints
    its events and stops training early when its policy says so."""

    def on_step_end(self, trainer: Trainer, step: StepResult) -> None:
        if trainer.guardrail is None or step.routing is None or not step.applied:
            return
        event = trainer.guardrail.check(step.step, step.routing)
        if event is None:
            return
        trainer.log(event)
        if trainer.dist.is_main:
            print(
                f"guardrail at step {step.step}: {event['layers']} -> {event['action']}",
                flush=True,
            )
        if trainer.guardrail.stop_requested:
            trainer.request_stop("guardrail")


class Checkpointing(Callback):
    """A checkpoint every ``train.checkpoint_every`` steps, at the last step and whenever
    training is asked to stop (a signal, ``stop_at``, a guardrail)."""

    def __init__(self, checkpoint_every: int, steps: int):
        self.checkpoint_every, self.steps = checkpoint_every, steps

    def on_step_end(self, trainer: Trainer, step: StepResult) -> None:
        periodic = self.checkpoint_every and step.step % self.checkpoint_every == 0
        if periodic or trainer.stop_reason is not None or step.step == self.steps:
            trainer.save_checkpoint()


class FinalEvaluation(Callback):
    """After a run that finished (or a guardrail stopped): the validation record, then on rank
    0 ``final_eval.json`` (:func:`~moealign.evaluation.run.evaluation_record` of the whole
    model, parameter counts, peak memory, ``stopped_early_at``) and the end time in meta.json.
    An interrupted or diverged run gets none."""

    def __init__(self, task_examples: int):
        self.task_examples = task_examples

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        if result.interrupted or result.diverged_at is not None:
            return
        result.final_eval = trainer.evaluate()
        trainer.log({"step": trainer.step, "split": "val", **result.final_eval})
        whole = trainer.whole_model()  # a collective when sharded
        if trainer.run is None:
            return
        counts = trainer.parameter_counts
        final = {
            "step": trainer.step,
            "params_total": counts["total"],
            "params_active": counts["active"],
            **evaluation_record(
                whole,
                trainer.last_evaluation,
                trainer.data,
                self.task_examples,
                trainer.autocast_dtype,
            ),
            "peak_memory_bytes": peak_memory_bytes(trainer.device),
        }
        if trainer.stopped_early_at is not None:
            final["stopped_early_at"] = trainer.stopped_early_at
        result.final_eval = final
        trainer.run.write_final_eval(strict_json(final))
        trainer.run.update_meta(end_time=utc_now(), steps=trainer.step)


class MirrorLoggers(Callback):
    """Copies every ``metrics.jsonl`` record to TensorBoard / W&B (``train.tensorboard``,
    ``train.wandb``; :mod:`moealign.training.loggers`)."""

    def __init__(self, loggers: LoggerGroup):
        self.loggers = loggers

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.loggers.log(record)

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        self.loggers.flush()

    def on_close(self, trainer: Trainer) -> None:
        self.loggers.close()


def default_callbacks(trainer: Trainer, extra: Sequence[Callback] = ()) -> list[Callback]:
    """The built-in callbacks of ``trainer``'s config with ``extra`` after them but before
    checkpointing (so a stop that ``extra`` requests is checkpointed, and ``extra`` sees the
    final evaluation in ``on_train_end``)."""
    config, train = trainer.config, trainer.config.train
    callbacks: list[Callback] = [
        ExpertBiasUpdate(),
        TrainLogging(train.log_every, train.steps),
        ProgressBar(train.steps, trainer.progress and trainer.dist.is_main),
        PeriodicEvaluation(train.eval_every, train.steps),
        Guardrail(),
        FinalEvaluation(train.task_eval_examples),
        *extra,
        Checkpointing(train.checkpoint_every, train.steps),
    ]
    if trainer.dist.is_main and (train.tensorboard or train.wandb):
        loggers = build_loggers(
            train,
            trainer.run_path,
            run_name=config.name,
            config=config.to_dict(),
            resume_step=trainer.step,
        )
        callbacks.append(MirrorLoggers(loggers))
    return callbacks
