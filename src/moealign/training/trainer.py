"""The training loop: one optimizer step after another, everything else in callbacks.

A step (DESIGN.md §4, §8) takes a global batch of ``train.batch_size`` sequences split into
``world_size × grad_accum`` micro-batches (rank r takes micro-batches r·grad_accum …
r·grad_accum + grad_accum − 1), backpropagates the :class:`~moealign.training.objective.
Objective` of each, and applies the optimizer, unless a loss or gradient is non-finite: then
``train.on_nonfinite`` says ``skip`` (no update, an event, go on) or ``stop`` (an event and the
run ends with ``TrainResult.diverged_at``). The step's routing statistics are one
:class:`~moealign.evaluation.routing_stats.RoutingStats`, reduced over ranks in one collective.
What happens around steps (expert-bias update, logs, evaluation, guardrails, checkpoints, the
final evaluation, dashboards) is :mod:`moealign.training.callbacks`.

``train.parallel`` picks DDP, FSDP2 or expert parallelism (:mod:`moealign.distributed.parallel`);
checkpoints always hold whole, finite tensors, so a run resumes at any world size. A resumed run
restores the model, optimizer, scheduler, RNG, data stream, loss-term and guardrail states and
ends with the same weights, bit for bit, as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import signal
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moealign.alignment.term import RoutingAlignment
from moealign.config import ConfigError, RunConfig
from moealign.data.batching import IGNORE_INDEX
from moealign.data.build import TrainingData, build_training_data
from moealign.distributed.context import DistributedContext
from moealign.distributed.parallel import Parallel, full_tensor
from moealign.evaluation.common import autocast, autocast_dtype, strict_json
from moealign.evaluation.lm import TASK_NAMES, LMEvaluation, evaluate_lm
from moealign.evaluation.routing_stats import RoutingStats, moe_shape
from moealign.nn.checkpointing import apply_activation_checkpointing
from moealign.nn.compile import compile_blocks
from moealign.nn.transformer import MoETransformer
from moealign.progress import phase
from moealign.training import state
from moealign.training.callbacks import Callback, StepResult, TrainResult, default_callbacks
from moealign.training.objective import LossTerm, Objective
from moealign.training.runs import TOKENIZER_DIR, RunDirectory

__all__ = ["Trainer", "TrainResult"]

log = logging.getLogger(__name__)

Batch = Mapping[str, torch.Tensor]


class Trainer:
    """Train ``model`` (default: ``MoETransformer(config.model)``) on ``data`` (default: built
    from ``config.data``) as configured by ``config``; see the module docstring.

    ``aux_terms`` are extra :class:`~moealign.training.objective.LossTerm`s of the objective;
    ``callbacks`` run after the built-in ones and before checkpointing. ``run_dir`` defaults to
    ``config.out_dir/config.name``. ``resume=True`` continues from the newest good checkpoint
    there (falling back past a corrupt one); ``overwrite=True`` replaces an existing run. Only
    rank 0 writes files.
    """

    def __init__(
        self,
        config: RunConfig,
        model: torch.nn.Module | None = None,
        data: TrainingData | None = None,
        *,
        aux_terms: Sequence[LossTerm] = (),
        callbacks: Sequence[Callback] = (),
        run_dir: str | Path | None = None,
        resume: bool = False,
        overwrite: bool = False,
        progress: bool = True,
    ) -> None:
        self.config, train_cfg = config, config.train
        self.dist = DistributedContext.from_env(train_cfg.device)
        self.device = self.dist.device
        shards = self.dist.world_size * train_cfg.grad_accum
        if train_cfg.batch_size % shards:
            raise ConfigError(
                "train.batch_size",
                f"got {train_cfg.batch_size}; expected a multiple of world_size × grad_accum = "
                f"{self.dist.world_size} × {train_cfg.grad_accum}",
            )
        self.autocast_dtype = autocast_dtype(train_cfg.precision, self.device)
        self.parallel = Parallel(train_cfg.parallel, self.dist, train_cfg.ep_size)
        if self.parallel.shards and model is not None and not isinstance(model, MoETransformer):
            raise ValueError(
                f"train.parallel={train_cfg.parallel!r} needs a MoETransformer model (its blocks "
                f"are sharded); got {type(model).__name__}: use train.parallel='ddp'"
            )
        per_block = train_cfg.activation_checkpointing != "none" or train_cfg.compile
        if per_block and model is not None and not isinstance(model, MoETransformer):
            raise ValueError(
                "train.activation_checkpointing and train.compile act on the blocks of a "
                f"MoETransformer model; got {type(model).__name__}: use 'none' and false"
            )

        # Every generator a checkpoint holds (capture_rng_state): one config and seed, one run.
        random.seed(train_cfg.seed)
        np.random.seed(train_cfg.seed)
        torch.manual_seed(train_cfg.seed)
        self.model = (model if model is not None else config.model.build()).to(self.device)
        if data is None:
            with phase("train: build the data"):
                data = build_training_data(config)
        self.data = data
        self.parameter_counts: dict[str, int] = self.model.parameter_counts()  # before sharding
        # Checkpointing, then compiling (of the checkpointed blocks), then sharding: torchtitan's
        # order. Neither changes a parameter name.
        apply_activation_checkpointing(self.model, train_cfg.activation_checkpointing)
        if train_cfg.compile:
            compile_blocks(self.model)
        # Shard before the optimizer is built: FSDP2 replaces the parameters by DTensors.
        self.forward_model: torch.nn.Module = self.parallel.apply(self.model)
        self.optimizer, self.scheduler = config.optim.build(self.model, train_cfg.steps)
        self.moe_shape = moe_shape(self.model)  # (L MoE layers, E experts)
        self.objective = Objective.from_config(config, *self.moe_shape, aux_terms)
        self.guardrail = (
            config.guardrails.build(self.moe_shape[1], self.objective.alignment)
            if self.moe_shape[0]
            else None
        )
        self.progress = progress
        self.step = self.tokens_seen = 0
        self.stop_reason: str | None = None
        self.stopped_early_at: int | None = None
        self.last_train: dict[str, float] = {}
        self.last_evaluation: LMEvaluation | None = None
        self._signal: str | None = None
        self.run_path = Path(run_dir) if run_dir is not None else config.run_dir
        self.checkpoint_dir = self.run_path / "checkpoints"
        self.run: RunDirectory | None = None
        # Checked, then restored, before the run folder is touched: a changed config or an
        # unusable checkpoint changes nothing.
        if self.dist.is_main:  # the rank that opens the run folder
            RunDirectory(self.run_path).check(config.to_dict(), resume=resume, overwrite=overwrite)
        restored = state.restore_state(self) if resume else False
        if self.dist.is_main:
            self.run = RunDirectory.open(
                self.run_path,
                config.to_dict(),
                seed=train_cfg.seed,
                device=str(self.device),
                resume=resume,
                overwrite=overwrite,
            )
        if self.run is not None:
            self.data.tokenizer.save_pretrained(self.run_path / TOKENIZER_DIR)
        if resume and self.run is not None:
            # Records after the restored step; without a checkpoint, every record.
            self.run.truncate_metrics(self.step if restored else -1)
        self.callbacks = default_callbacks(self, callbacks)

    @property
    def alignment(self) -> RoutingAlignment | None:
        """The objective's routing alignment term (None when ``alignment.schedule = "none"``)."""
        return self.objective.alignment

    # ------------------------------------------------------------------ whole tensors

    def whole_model(self) -> torch.nn.Module | None:
        """The model with whole tensors (:func:`moealign.training.state.whole_model`)."""
        return state.whole_model(self)

    def save_checkpoint(self) -> Path | None:
        """Checkpoint the current step (:func:`moealign.training.state.save_state`)."""
        return state.save_state(self)

    # ------------------------------------------------------------------ one step

    def _micro_batches(self, batch: Batch) -> list[dict[str, torch.Tensor]]:
        """This rank's ``grad_accum`` micro-batches of a global batch, on the device."""
        grad_accum = self.config.train.grad_accum
        first = self.dist.rank * grad_accum
        pieces = {
            key: value.chunk(self.dist.world_size * grad_accum) for key, value in batch.items()
        }
        return [
            {
                key: chunks[first + m].to(self.device, non_blocking=True)
                for key, chunks in pieces.items()
            }
            for m in range(grad_accum)
        ]

    def train_step(self, batch: Batch) -> dict[str, float]:
        """One optimizer step on a global batch; returns the step's (rank-reduced) metrics."""
        return self._step(batch).metrics

    def _step(self, batch: Batch) -> StepResult:
        micro_batches = self._micro_batches(batch)
        targets = sum(int((mb["labels"] != IGNORE_INDEX).sum()) for mb in micro_batches)
        targets_1 = torch.tensor([targets], dtype=torch.float64, device=self.device)
        global_tokens = float(self.dist.all_reduce_sum(targets_1).item())
        lm_scale = self.dist.world_size / max(global_tokens, 1.0)
        routing = None
        if self.moe_shape[0]:
            routing = RoutingStats(*self.moe_shape, task_names=TASK_NAMES, device=self.device)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        for index, micro in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            with self.parallel.accumulating(self.forward_model, sync=last):
                with autocast(self.device, self.autocast_dtype):
                    output = self.forward_model(micro["input_ids"])
                loss = self.objective.micro_batch_loss(
                    micro, output, self.step, lm_scale, len(micro_batches)
                )
                loss.backward()
            if routing is not None:
                routing.add(output.routing, micro.get("task_ids"))

        self.parallel.reduce_gradients(self.model)
        n_micro = len(micro_batches) * self.dist.world_size
        metrics = self.objective.step_metrics(self.dist.all_reduce_sum, global_tokens, n_micro)
        router_grad_norms = self._router_grad_norms()
        max_norm = self.config.optim.grad_clip if self.config.optim.grad_clip > 0 else math.inf
        metrics["grad_norm"] = self.parallel.clip_grad_norm_(self.model, max_norm)
        # Equal on every rank: the loss is reduced, the gradient norm global.
        nonfinite = [name for name in ("loss", "grad_norm") if not math.isfinite(metrics[name])]
        if not nonfinite:
            self.optimizer.step()
        self._notify("on_optimizer_step", not nonfinite)
        self.objective.end_step(self.dist.all_reduce_sum, not nonfinite)
        self.scheduler.step()
        self.step += 1
        self.tokens_seen += batch["input_ids"].numel()
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        summary = None
        if routing is not None:
            routing.reduce(self.dist.all_reduce_sum)
            summary = routing.summary()
            summary.router_grad_norm = router_grad_norms
            metrics.update(summary.record("routing/"))
        return StepResult(self.step, metrics, summary, batch["input_ids"].numel(), nonfinite)

    def _router_grad_norms(self) -> torch.Tensor | None:
        """‖∇ router‖₂ per MoE layer (guardrail monitoring, DESIGN.md §4), before clipping."""
        norms = []
        for moe in getattr(self.model, "moe_layers", []):
            grads = [full_tensor(p.grad) for p in moe.router.parameters() if p.grad is not None]
            if not grads:
                return None
            norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
        return torch.stack(norms).double().cpu() if norms else None

    # ------------------------------------------------------------------ evaluation, logs

    def evaluate(self) -> dict[str, float]:
        """The validation record over ``data.validation`` (:func:`evaluate_lm` on every rank, in
        the run's precision) with the routing statistics of the whole set and the projection
        alignment λ per layer; kept as ``last_evaluation``."""
        evaluation = evaluate_lm(
            self.model,
            self.data.validation,
            autocast_dtype=self.autocast_dtype,
            dist=self.dist,
            sharded=self.parallel.shards,
        )
        if evaluation.routing is not None:
            evaluation.routing.with_projection_alignment(self.whole_model())  # None off rank 0
        self.last_evaluation = evaluation
        self._notify("on_evaluation", evaluation)
        return evaluation.record("val_")

    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` to ``metrics.jsonl`` as strict JSON (rank 0) and pass it to the
        callbacks' ``on_log``."""
        if self.run is None:
            return
        record = strict_json(record)
        self.run.log_metrics(record)
        self._notify("on_log", record)

    def request_stop(self, reason: str) -> None:
        """End training after the current step (checkpointed); ``"guardrail"`` stops early and
        still evaluates, any other reason interrupts."""
        self.stop_reason = reason
        if reason == "guardrail":
            self.stopped_early_at = self.step

    # ------------------------------------------------------------------ the loop

    def train(self, stop_at: int | None = None) -> TrainResult:
        """Run until ``train.steps`` optimizer steps. A SIGINT/SIGTERM, or reaching step
        ``stop_at`` (to split a run into time slices), checkpoints the finished step and
        returns with ``interrupted=True``; ``resume=True`` continues from there. The run folder
        is locked until it returns (:class:`moealign.training.runs.RunLock`)."""
        steps = self.config.train.steps
        if stop_at is not None and not 0 < stop_at <= steps:
            raise ValueError(f"stop_at: got {stop_at}; expected 1 <= stop_at <= {steps}")
        result = TrainResult(self.step, False, self.run.path if self.run is not None else None)
        self.stop_reason = None
        if self.run is not None:
            self.run.hold()
        with self._stop_on_signals():
            self._notify("on_train_start")
            while self.step < steps:
                step = self._step(next(self.data.train))
                if step.nonfinite and self._nonfinite(step):
                    result.diverged_at = step.step
                    break
                if self.dist.any(self._signal is not None):
                    self.request_stop(self._signal or "another rank's signal")
                elif self.step == stop_at and self.step < steps:
                    self.request_stop(f"stop_at={stop_at}")
                self._notify("on_step_end", step)
                if self.stop_reason is not None:
                    break
        result.step, result.last_train = self.step, self.last_train
        result.interrupted = self.stop_reason not in (None, "guardrail")
        if result.interrupted:
            result.stop_signal = self._signal
            log.warning(
                "stopped by %s after step %d; checkpoint saved, continue with resume",
                self.stop_reason,
                self.step,
            )
        self._notify("on_train_end", result)
        if self.run is not None:
            self.run.close()  # nothing more is written: other processes may use the run now
        return result

    def _nonfinite(self, step: StepResult) -> bool:
        """Record a step with a non-finite loss or gradient; True when it ends training."""
        stop = self.config.train.on_nonfinite == "stop"
        if stop:
            self.log({"step": step.step, "split": "train", **step.metrics})
        action = "training stopped" if stop else "optimizer step skipped"
        log.warning("step %d: non-finite %s; %s", step.step, ", ".join(step.nonfinite), action)
        event = {"event": "nonfinite", "policy": self.config.train.on_nonfinite, "action": action}
        self.log({"step": step.step, **event, "values": step.nonfinite})
        return stop

    def _notify(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM ask the loop to stop after the current step (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum: int, frame: Any) -> None:
            self._signal = signal.Signals(signum).name

        previous = {
            sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def close(self) -> None:
        """Close the callbacks (dashboards), release the run folder's lock and the process
        group if this trainer created it."""
        self._notify("on_close")
        if self.run is not None:
            self.run.close()
        self.dist.close()
