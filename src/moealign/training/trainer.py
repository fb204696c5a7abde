"""The training loop: loss, accumulation, schedule, evaluation, logging, checkpoints, resume.

One optimizer step (DESIGN.md §4, §8) on a global batch of ``train.batch_size`` sequences,
split into ``world_size × grad_accum`` micro-batches (rank r takes micro-batches
r·grad_accum … r·grad_accum + grad_accum − 1):

    L = L_lm + α · mean_l L_bal,l + β · mean_l L_z,l + Σ_j aux_j(batch, output, step)

L_lm is the token cross-entropy summed over the whole global batch and divided by its number of
target tokens (labels ≠ −100), so that accumulation and data parallelism give the same gradient
as one big batch; the router terms are means over micro-batches (each micro-batch is one
"batch" of the balance loss, DESIGN.md §4). α = ``loss.balance_coef``, β = ``loss.z_coef``.
``aux_terms`` are callables ``(micro_batch, model_output, step) -> {name: tensor}`` whose
tensors are added to the loss as given (e.g. λ(t)·L_align); a term with ``state_dict()``/
``load_state_dict()`` is checkpointed with the run, and one with ``end_step(reduce_sum)`` is
called on every rank after each optimizer step (``reduce_sum`` sums a tensor over ranks).

After each optimizer step the aux-loss-free expert biases are updated from the expert counts,
all-reduced over data-parallel ranks. ``train.parallel`` picks DDP, FSDP2 or expert parallelism
(:mod:`moealign.distributed.parallel`); checkpoints always hold whole tensors, so a run resumes at
any world size. A resumed run restores the model, optimizer, scheduler,
RNG, data stream and aux-term states and ends with the same weights, bit for bit, as an
uninterrupted run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from moealign.alignment.guardrails import RoutingGuardrail
from moealign.alignment.term import build_alignment
from moealign.config import ConfigError, RunConfig
from moealign.data.build import TrainingData, build_training_data
from moealign.data.tasks import TASK_IDS
from moealign.distributed.context import DistributedContext
from moealign.distributed.parallel import Parallel, full_tensor
from moealign.evaluation import diagnostics
from moealign.evaluation.diagnostics import routing_projection_alignment
from moealign.evaluation.tasks import evaluate_suite, per_task_accuracy
from moealign.nn import update_expert_biases
from moealign.nn.transformer import MoETransformer
from moealign.optim.optimizers import build_optimizer
from moealign.optim.schedules import WarmupCosine
from moealign.training.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_latest,
    restore_rng_state,
    save_checkpoint,
)
from moealign.training.loggers import LoggerGroup, build_loggers
from moealign.training.runs import TOKENIZER_DIR, RunDirectory, peak_memory_bytes, utc_now

__all__ = ["AuxTerm", "Trainer", "TrainResult"]

log = logging.getLogger(__name__)

Batch = Mapping[str, torch.Tensor]
AuxTerm = Callable[[Batch, Any, int], Mapping[str, torch.Tensor]]
IGNORE_INDEX = -100


@dataclass
class TrainResult:
    """What :meth:`Trainer.train` returns; ``final_eval`` is empty if the run was interrupted."""

    step: int
    interrupted: bool
    run_dir: Path | None
    last_train: dict[str, float] = field(default_factory=dict)
    final_eval: dict[str, Any] = field(default_factory=dict)


_TASK_NAMES = sorted(TASK_IDS, key=TASK_IDS.__getitem__)


@dataclass
class _RoutingAccumulator:
    """Per-layer sums over the micro-batches of one step (or one evaluation).

    ``max_vio`` is computed from the pooled expert loads (the step's whole batch, or the whole
    evaluation set: MaxVio_global); ``max_vio_batch`` is the mean over micro-batches of each
    micro-batch's own MaxVio (DESIGN.md §4: MaxVio_batch). With the batch's ``task_ids`` it also
    sums each task's routing probabilities, so that the summary holds per layer and task the
    normalised entropy of the task's routing distribution H(p_l(·|τ))/log E, p_l(e|τ) = mean of
    probs_te over τ's tokens (DESIGN.md §4 guardrails). The task table has one row per known
    task id (``TASK_IDS``) so ranks all-reduce equal shapes.
    """

    counts_LE: torch.Tensor | None = None
    balance_L: torch.Tensor | None = None
    z_L: torch.Tensor | None = None
    token_entropy_sum_L: torch.Tensor | None = None
    max_vio_batch_sum_L: torch.Tensor | None = None
    task_probs_sum_LNE: torch.Tensor | None = None
    task_tokens_N: torch.Tensor | None = None
    tokens: int = 0
    batches: int = 0

    def add(self, routing: Sequence[Any], task_ids: torch.Tensor | None = None) -> None:
        if not routing:
            return
        counts = torch.stack([r.expert_counts.detach().float() for r in routing])
        balance = torch.stack([r.load_balance_loss.detach().float() for r in routing])
        z = torch.stack([r.z_loss.detach().float() for r in routing])
        tokens = routing[0].probs.shape[0]
        # token_entropy is the mean over tokens; weight by T so that batches pool exactly.
        entropy = torch.stack(
            [diagnostics.token_entropy(r.probs.detach()) * tokens for r in routing]
        ).float()
        max_vio = diagnostics.max_violation(counts).float()
        if self.counts_LE is None:
            self._zeros(tuple(counts.shape), counts.device)
        self.counts_LE += counts
        self.balance_L += balance
        self.z_L += z
        self.token_entropy_sum_L += entropy
        self.max_vio_batch_sum_L += max_vio
        if task_ids is not None:
            self._add_tasks(routing, task_ids)
        self.tokens += tokens
        self.batches += 1

    def _zeros(self, shape_LE: tuple[int, int], device: torch.device) -> None:
        n_layers, n_experts = shape_LE
        self.counts_LE = torch.zeros(shape_LE, device=device)
        self.balance_L, self.z_L, self.token_entropy_sum_L, self.max_vio_batch_sum_L = torch.zeros(
            4, n_layers, device=device
        )
        self.task_probs_sum_LNE = torch.zeros(n_layers, len(TASK_IDS), n_experts, device=device)
        self.task_tokens_N = torch.zeros(len(TASK_IDS), device=device)

    def _add_tasks(self, routing: Sequence[Any], task_ids: torch.Tensor) -> None:
        task_ids_T = task_ids.reshape(-1).to(self.task_tokens_N.device)
        labelled_T = task_ids_T >= 0
        ids = task_ids_T[labelled_T]
        self.task_tokens_N += torch.bincount(ids, minlength=len(TASK_IDS)).float()
        for layer, info in enumerate(routing):
            probs_TE = info.probs.detach().float()[labelled_T]
            self.task_probs_sum_LNE[layer].index_add_(0, ids, probs_TE)

    def _task_entropy(self, dist_ctx: DistributedContext, prefix: str) -> dict[str, float]:
        dist_ctx.all_reduce_sum(self.task_probs_sum_LNE)
        dist_ctx.all_reduce_sum(self.task_tokens_N)
        present_N = self.task_tokens_N > 0
        if not present_N.any():
            return {}
        p_LNE = self.task_probs_sum_LNE[:, present_N] / self.task_tokens_N[present_N, None]
        entropy_LN = diagnostics.entropy(p_LNE)
        names = [_TASK_NAMES[int(i)] for i in present_N.nonzero().flatten()]
        out = {f"{prefix}task_entropy": float(entropy_LN.mean())}
        for layer, entropy_N in enumerate(entropy_LN.tolist()):
            out[f"{prefix}layer{layer}/task_entropy"] = sum(entropy_N) / len(entropy_N)
            for name, value in zip(names, entropy_N, strict=True):
                out[f"{prefix}layer{layer}/task_entropy/{name}"] = value
        return out

    def summary(
        self, dist_ctx: DistributedContext, prefix: str, shape_LE: tuple[int, int]
    ) -> dict[str, float]:
        """Per-layer statistics of the accumulated routing, reduced over ranks. A rank that saw
        no batch joins the reductions with zeros of ``shape_LE`` (L MoE layers, E experts)."""
        if self.counts_LE is None:
            if not dist_ctx.enabled or shape_LE[0] == 0:
                return {}
            self._zeros(shape_LE, dist_ctx.device)
        per_batch_sums = [self.balance_L, self.z_L, self.token_entropy_sum_L]
        scalars = torch.stack([*per_batch_sums, self.max_vio_batch_sum_L])  # type: ignore[list-item]
        dist_ctx.all_reduce_sum(self.counts_LE)
        dist_ctx.all_reduce_sum(scalars)
        totals = torch.tensor(
            [self.tokens, self.batches], dtype=torch.float64, device=scalars.device
        )
        dist_ctx.all_reduce_sum(totals)
        tokens, batches = totals.tolist()
        balance_L, z_L = scalars[0] / batches, scalars[1] / batches
        entropy_L = scalars[2] / tokens
        stats: dict[str, list[float]] = {
            "balance_loss": balance_L.tolist(),
            "z_loss": z_L.tolist(),
            "max_vio": diagnostics.max_violation(self.counts_LE).tolist(),
            "max_vio_batch": (scalars[3] / batches).tolist(),
            "dead_experts": diagnostics.dead_experts(self.counts_LE).float().tolist(),
            "usage_entropy": diagnostics.usage_entropy(self.counts_LE).tolist(),
            "token_entropy": entropy_L.tolist(),
        }
        out: dict[str, float] = {}
        for name, per_layer in stats.items():
            out[f"{prefix}{name}"] = sum(per_layer) / len(per_layer)
            for layer, value in enumerate(per_layer):
                out[f"{prefix}layer{layer}/{name}"] = value
        return out | self._task_entropy(dist_ctx, prefix)


class Trainer:
    """Train ``model`` (default: ``MoETransformer(config.model)``) on ``data`` (default: built
    from ``config.data``) as configured by ``config``; see the module docstring.

    ``run_dir`` defaults to ``config.out_dir/config.name``. ``resume=True`` continues from the
    newest good checkpoint there (falling back past a corrupt one); ``overwrite=True`` replaces
    an existing run. Only rank 0 writes files.
    """

    def __init__(
        self,
        config: RunConfig,
        model: torch.nn.Module | None = None,
        data: TrainingData | None = None,
        *,
        aux_terms: Sequence[AuxTerm] = (),
        run_dir: str | Path | None = None,
        resume: bool = False,
        overwrite: bool = False,
        progress: bool = True,
    ) -> None:
        self.config = config
        train_cfg = config.train
        self.dist = DistributedContext.from_env(train_cfg.device)
        self.device = self.dist.device
        shards = self.dist.world_size * train_cfg.grad_accum
        if train_cfg.batch_size % shards:
            raise ConfigError(
                "train.batch_size",
                f"got {train_cfg.batch_size}; expected a multiple of world_size × grad_accum = "
                f"{self.dist.world_size} × {train_cfg.grad_accum}",
            )
        self.autocast_dtype = self._autocast_dtype(train_cfg.precision)
        self.parallel = Parallel(train_cfg.parallel, self.dist, train_cfg.ep_size)
        if self.parallel.shards and model is not None and not isinstance(model, MoETransformer):
            raise ValueError(
                f"train.parallel={train_cfg.parallel!r} needs a MoETransformer model (its blocks "
                f"are sharded); got {type(model).__name__}: use train.parallel='ddp'"
            )

        # Every generator a checkpoint holds (capture_rng_state): one config and seed, one run.
        random.seed(train_cfg.seed)
        np.random.seed(train_cfg.seed)
        torch.manual_seed(train_cfg.seed)
        self.model = (model if model is not None else MoETransformer(config.model)).to(self.device)
        self.data = data if data is not None else build_training_data(config)
        # Counted before sharding, so they are the whole model's on every rank.
        self.parameter_counts: dict[str, int] = self.model.parameter_counts()
        # Shard before the optimizer is built: FSDP2 replaces the parameters by DTensors.
        self.forward_model: torch.nn.Module = self.parallel.apply(self.model)
        self.optimizer = build_optimizer(
            self.model,
            name=config.optim.name,
            lr=config.optim.lr,
            weight_decay=config.optim.weight_decay,
            betas=config.optim.betas,
            matrix_lr=config.optim.matrix_lr,
            **config.optim.options,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            WarmupCosine(
                warmup_steps=config.optim.warmup_steps,
                total_steps=train_cfg.steps,
                min_lr_ratio=config.optim.min_lr_ratio,
                schedule=config.optim.schedule,
            ),
        )
        moe_layers = getattr(self.model, "moe_layers", [])
        n_experts = config.model.n_experts
        self.alignment = build_alignment(config.alignment, len(moe_layers), n_experts)
        self.aux_terms = list(aux_terms) + ([self.alignment] if self.alignment else [])
        self.guardrail = (
            RoutingGuardrail(config.guardrails, n_experts, self.alignment) if moe_layers else None
        )
        self.stopped_early_at: int | None = None
        self.progress = progress
        self.step = 0
        self.tokens_seen = 0
        self._stop_signal: str | None = None

        run_path = Path(run_dir) if run_dir is not None else config.run_dir
        self.run = (
            RunDirectory.open(
                run_path,
                config.to_dict(),
                seed=train_cfg.seed,
                device=str(self.device),
                resume=resume,
                overwrite=overwrite,
            )
            if self.dist.is_main
            else None
        )
        if self.run is not None:
            self.data.tokenizer.save_pretrained(run_path / TOKENIZER_DIR)
        self.checkpoint_dir = run_path / "checkpoints"
        if resume:
            self._restore()
        # Optional dashboards next to metrics.jsonl (rank 0 only; DESIGN.md §8).
        self.loggers = (
            build_loggers(
                train_cfg,
                run_path,
                run_name=config.name,
                config=config.to_dict(),
                resume_step=self.step,
            )
            if self.dist.is_main
            else LoggerGroup()
        )
        self.last_eval_expert_counts_LE: torch.Tensor | None = None

    # ------------------------------------------------------------------ set-up helpers

    def _autocast_dtype(self, precision: str) -> torch.dtype | None:
        if precision == "fp32":
            return None
        if precision == "bf16":
            return torch.bfloat16
        cuda_bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else None

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _trainer_state(self) -> dict[str, Any]:
        return {
            "scheduler": self.scheduler.state_dict(),
            "rng": capture_rng_state(),
            "data": self.data.train.state_dict(),
            "tokens_seen": self.tokens_seen,
            "aux_terms": [
                term.state_dict() if hasattr(term, "state_dict") else None
                for term in self.aux_terms
            ],
            "guardrail": self.guardrail.state_dict() if self.guardrail else None,
        }

    def _restore(self) -> None:
        checkpoint = load_latest(self.checkpoint_dir, fallback=True)
        if checkpoint is None:
            log.warning("resume: no checkpoint in %s; starting from step 0", self.checkpoint_dir)
            return
        if self.parallel.shards:
            whole = self._whole_model_copy()
            checkpoint.load_model(whole)
            self.parallel.load_full_model_state(self.model, whole.state_dict())
            self.parallel.load_full_optimizer_state(
                self.model, self.optimizer, checkpoint.optimizer_state()
            )
        else:
            checkpoint.load_model(self.model)
            checkpoint.load_optimizer(self.optimizer)
        state = checkpoint.trainer_state
        self.scheduler.load_state_dict(state["scheduler"])
        self.data.train.load_state_dict(state["data"])
        if len(state["aux_terms"]) != len(self.aux_terms):
            raise CheckpointError(
                f"checkpoint {checkpoint.path} holds {len(state['aux_terms'])} aux-term states; "
                f"this trainer has {len(self.aux_terms)} aux terms"
            )
        for term, term_state in zip(self.aux_terms, state["aux_terms"], strict=True):
            if term_state is not None:
                term.load_state_dict(term_state)
        if self.guardrail is not None and state.get("guardrail") is not None:
            self.guardrail.load_state_dict(state["guardrail"])
        restore_rng_state(state["rng"])
        self.tokens_seen = state["tokens_seen"]
        self.step = checkpoint.step
        if self.run is not None:
            self.run.truncate_metrics(self.step)
        log.info("resumed from %s at step %d", checkpoint.path, self.step)

    def _whole_model_copy(self) -> MoETransformer:
        """A fresh unsharded model of the run's architecture (its RNG draws do not count)."""
        with torch.random.fork_rng(devices=[]):
            return MoETransformer(self.config.model).to(self.device)

    def whole_model(self) -> torch.nn.Module | None:
        """The model with whole tensors: itself, or, when sharded, a copy gathered on rank 0
        (None on the other ranks). A collective when sharded: call it on every rank."""
        if not self.parallel.shards:
            return self.model
        state = self.parallel.full_model_state(self.model)
        if not self.dist.is_main:
            return None
        whole = self._whole_model_copy()
        whole.load_state_dict(state)
        return whole.train(self.model.training)

    def save_checkpoint(self) -> Path | None:
        """Checkpoint the current step (rank 0 writes; returns the directory there). Sharded
        runs gather whole tensors first, so every rank must call it."""
        model: torch.nn.Module | None = self.model
        optimizer: Any = self.optimizer
        if self.parallel.shards:
            model = self.whole_model()
            optimizer = self.parallel.full_optimizer_state(self.model, self.optimizer)
        if not self.dist.is_main:
            return None
        return save_checkpoint(
            self.checkpoint_dir,
            self.step,
            model,
            optimizer,
            self._trainer_state(),
            keep=self.config.train.keep_checkpoints,
        )

    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM ask the loop to stop after the current step (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum: int, frame: Any) -> None:
            self._stop_signal = signal.Signals(signum).name

        previous = {
            sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # ------------------------------------------------------------------ one step

    def _micro_batches(self, batch: Batch) -> list[dict[str, torch.Tensor]]:
        """This rank's ``grad_accum`` micro-batches of a global batch, on the device."""
        grad_accum = self.config.train.grad_accum
        n_shards = self.dist.world_size * grad_accum
        first = self.dist.rank * grad_accum
        pieces = {key: value.chunk(n_shards) for key, value in batch.items()}
        return [
            {
                key: chunks[first + m].to(self.device, non_blocking=True)
                for key, chunks in pieces.items()
            }
            for m in range(grad_accum)
        ]

    def _router_losses(self, routing: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean over MoE layers of L_bal, mean of L_z); zeros for a model without MoE layers."""
        if not routing:
            zero = torch.zeros((), device=self.device)
            return zero, zero
        balance = torch.stack([r.load_balance_loss for r in routing]).float().mean()
        z = torch.stack([r.z_loss for r in routing]).float().mean()
        return balance, z

    def train_step(self, batch: Batch) -> dict[str, float]:
        """One optimizer step on a global batch; returns the step's (rank-reduced) metrics."""
        cfg = self.config
        micro_batches = self._micro_batches(batch)
        target_tokens = torch.tensor(
            [sum(int((mb["labels"] != IGNORE_INDEX).sum()) for mb in micro_batches)],
            dtype=torch.float64,
            device=self.device,
        )
        global_tokens = float(self.dist.all_reduce_sum(target_tokens).item())
        lm_scale = self.dist.world_size / max(global_tokens, 1.0)

        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        routing_stats = _RoutingAccumulator()
        sums: dict[str, torch.Tensor] = {}
        for index, micro in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            with self.parallel.accumulating(self.forward_model, sync=last):
                with self._autocast():
                    output = self.forward_model(micro["input_ids"])
                logits_BSV = output.logits.float()
                lm_sum = F.cross_entropy(
                    logits_BSV.flatten(0, 1),
                    micro["labels"].flatten(),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
                balance, z = self._router_losses(output.routing)
                terms = {"balance_loss": balance, "z_loss": z}
                router_loss = cfg.loss.balance_coef * balance + cfg.loss.z_coef * z
                for aux_term in self.aux_terms:
                    extra = aux_term(micro, output, self.step)
                    terms.update(extra)
                    router_loss = router_loss + sum(extra.values())
                loss = lm_sum * lm_scale + router_loss / len(micro_batches)
                loss.backward()
            routing_stats.add(output.routing, micro.get("task_ids"))
            for name, value in {"lm_loss_sum": lm_sum, "aux_loss": router_loss, **terms}.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float()

        self.parallel.reduce_gradients(self.model)
        router_grad_norms = self._router_grad_norms()
        grad_norm = self._clip_gradients()
        self.optimizer.step()
        # Counts are all-reduced over ranks inside Router.update_expert_bias (DESIGN.md §2).
        update_expert_biases(self.model)
        for term in self.aux_terms:
            if hasattr(term, "end_step"):
                term.end_step(self.dist.all_reduce_sum)
        self.scheduler.step()
        self.step += 1
        self.tokens_seen += batch["input_ids"].numel()

        names = list(sums)
        reduced = self.dist.all_reduce_sum(torch.stack([sums[n] for n in names]))
        n_micro = len(micro_batches) * self.dist.world_size
        metrics = {
            name: float(value) / (global_tokens if name == "lm_loss_sum" else n_micro)
            for name, value in zip(names, reduced.tolist(), strict=True)
        }
        metrics["lm_loss"] = metrics.pop("lm_loss_sum")
        metrics["loss"] = metrics["lm_loss"] + metrics["aux_loss"]
        metrics["grad_norm"] = grad_norm
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        metrics.update(routing_stats.summary(self.dist, "routing/", self._routing_shape()))
        metrics.update(router_grad_norms)
        for term in self.aux_terms:
            metrics.update(getattr(term, "metrics", {}))
        return metrics

    def _routing_shape(self) -> tuple[int, int]:
        """(MoE layers, experts) of the routing statistics."""
        return len(getattr(self.model, "moe_layers", [])), self.config.model.n_experts

    def _router_grad_norms(self) -> dict[str, float]:
        """‖∇ router‖₂ per MoE layer (guardrail monitoring, DESIGN.md §4), before clipping."""
        norms = {}
        for layer, moe in enumerate(getattr(self.model, "moe_layers", [])):
            grads = [full_tensor(p.grad) for p in moe.router.parameters() if p.grad is not None]
            if grads:
                norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
                norms[f"routing/layer{layer}/router_grad_norm"] = float(norm)
        return norms

    def _clip_gradients(self) -> float:
        max_norm = self.config.optim.grad_clip if self.config.optim.grad_clip > 0 else math.inf
        return self.parallel.clip_grad_norm_(self.model, max_norm)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss and perplexity over ``train.eval_batches`` validation batches, with
        per-layer routing statistics (``max_vio`` over the whole evaluation set, MaxVio_global;
        ``max_vio_batch`` the mean over validation batches) and the projection alignment λ
        per layer."""
        batches = list(self.data.validation)[: self.config.train.eval_batches]
        self.model.eval()
        routing_stats = _RoutingAccumulator()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            for batch in batches:
                rows = torch.arange(batch["input_ids"].shape[0]).tensor_split(self.dist.world_size)
                mine = rows[self.dist.rank]
                if mine.numel() == 0:
                    if self.parallel.shards:
                        # A sharded forward is a collective: join it on a stand-in row whose
                        # results are discarded.
                        with self._autocast():
                            self.model(batch["input_ids"][:1].to(self.device))
                    continue
                input_ids = batch["input_ids"][mine].to(self.device)
                labels = batch["labels"][mine].to(self.device)
                with self._autocast():
                    output = self.model(input_ids)
                totals[0] += F.cross_entropy(
                    output.logits.float().flatten(0, 1),
                    labels.flatten(),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                ).double()
                totals[1] += (labels != IGNORE_INDEX).sum()
                task_ids = batch["task_ids"][mine] if "task_ids" in batch else None
                routing_stats.add(output.routing, task_ids)
        self.model.train()
        self.dist.all_reduce_sum(totals)
        summary = routing_stats.summary(self.dist, "val_routing/", self._routing_shape())
        summary |= self._projection_alignment_record()
        self.last_eval_expert_counts_LE = routing_stats.counts_LE  # reduced over ranks
        loss = float(totals[0] / totals[1].clamp_min(1))
        return {
            "val_loss": loss,
            "val_ppl": math.exp(min(loss, 700.0)),
            "val_tokens": float(totals[1]),
            **summary,
        }

    def _projection_alignment_record(self) -> dict[str, float]:
        """λ per MoE layer (MPI paper Eq. 11, DESIGN.md §3) and its mean over layers, keyed as
        the other evaluation routing statistics (``val_routing/layer{l}/projection_alignment``);
        empty for a model without MoE layers."""
        if not getattr(self.model, "moe_layers", []):
            return {}
        model = self.whole_model()  # a collective when sharded; None off rank 0 then
        if model is None:
            return {}
        per_layer = routing_projection_alignment(model)
        record = {"val_routing/projection_alignment": sum(per_layer) / len(per_layer)}
        for layer, value in enumerate(per_layer):
            record[f"val_routing/layer{layer}/projection_alignment"] = value
        return record

    # ------------------------------------------------------------------ the loop

    def _log(self, record: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log_metrics(record)
            self.loggers.log(record)

    def _guard(self, metrics: dict[str, float], bar: tqdm) -> bool:
        """Run the routing guardrail on this step's metrics; True when it ends training."""
        if self.guardrail is None:
            return False
        event = self.guardrail.check(self.step, metrics)
        if event is None:
            return False
        self._log(event)
        if self.dist.is_main:
            bar.write(f"guardrail at step {self.step}: {event['layers']} -> {event['action']}")
        if self.guardrail.stop_requested:
            self.stopped_early_at = self.step
            return True
        return False

    def evaluate_model_extras(self, model: torch.nn.Module | None = None) -> dict[str, Any]:
        """The end-of-run evaluation beyond the validation loss (rank 0 only) of ``model``
        (default: the trained model; a sharded run passes :meth:`whole_model`): greedy answers
        on the task suite's evaluation sets (``train.task_eval_examples`` per task and set)
        and, for MoE models, the projection alignment λ per layer (MPI paper Eq. 11)."""
        model = self.model if model is None else model
        extras: dict[str, Any] = {}
        if model.moe_layers:
            extras["projection_alignment"] = routing_projection_alignment(model)
        limit = self.config.train.task_eval_examples
        if self.data.suite is not None and limit > 0:
            with self._autocast():
                tasks = evaluate_suite(
                    model, self.data.tokenizer, self.data.suite, max_examples_per_task=limit
                )
            extras["tasks"] = tasks
            extras["task_accuracy"] = per_task_accuracy(tasks)
            extras["task_accuracy_seen"] = tasks["seen_mean"]
            if tasks["heldout_mean"] is not None:
                extras["task_accuracy_heldout"] = tasks["heldout_mean"]
        return extras

    def train(self, stop_at: int | None = None) -> TrainResult:
        """Run until ``train.steps`` optimizer steps. A SIGINT/SIGTERM, or reaching step
        ``stop_at`` (to split a run into time slices), checkpoints the finished step and
        returns with ``interrupted=True``; ``resume=True`` continues from there."""
        cfg = self.config.train
        if stop_at is not None and not 0 < stop_at <= cfg.steps:
            raise ValueError(f"stop_at: got {stop_at}; expected 1 <= stop_at <= {cfg.steps}")
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            disable=not (self.progress and self.dist.is_main),
            unit="step",
        )
        last_train: dict[str, float] = {}
        interrupted = False
        window_start, window_tokens = time.perf_counter(), 0
        try:
            with self._stop_on_signals():
                while self.step < cfg.steps:
                    batch = next(self.data.train)
                    metrics = self.train_step(batch)
                    window_tokens += batch["input_ids"].numel()
                    bar.update(1)
                    if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                        elapsed = time.perf_counter() - window_start
                        metrics["tokens_per_s"] = window_tokens / max(elapsed, 1e-9)
                        metrics["tokens_seen"] = self.tokens_seen
                        last_train = metrics
                        self._log({"step": self.step, "split": "train", **metrics})
                        bar.set_postfix(
                            loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}"
                        )
                        window_start, window_tokens = time.perf_counter(), 0
                    if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                        self._log({"step": self.step, "split": "val", **self.evaluate()})
                    if self._guard(metrics, bar):
                        self.save_checkpoint()
                        break
                    stop = self.dist.any(self._stop_signal is not None) or (
                        self.step == stop_at and self.step < cfg.steps
                    )
                    periodic = cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0
                    if periodic or stop or self.step == cfg.steps:
                        self.save_checkpoint()
                    if stop:
                        interrupted = True
                        log.warning(
                            "stopped by %s after step %d; checkpoint saved, continue with resume",
                            self._stop_signal or f"stop_at={stop_at} or another rank's signal",
                            self.step,
                        )
                        break
        finally:
            bar.close()
        final_eval: dict[str, Any] = {}
        if not interrupted:
            final_eval = self.evaluate()
            self._log({"step": self.step, "split": "val", **final_eval})
            whole = self.whole_model()
            if self.run is not None:
                counts = self.parameter_counts
                final_eval |= self.evaluate_model_extras(whole)
                if self.stopped_early_at is not None:
                    final_eval["stopped_early_at"] = self.stopped_early_at
                self.run.write_final_eval(
                    {
                        "step": self.step,
                        "params_total": counts["total"],
                        "params_active": counts["active"],
                        **final_eval,
                        **self._resource_record(),
                    }
                )
                self.run.update_meta(end_time=utc_now(), steps=self.step)
        self.loggers.flush()
        return TrainResult(
            step=self.step,
            interrupted=interrupted,
            run_dir=self.run.path if self.run is not None else None,
            last_train=last_train,
            final_eval=final_eval,
        )

    def _resource_record(self) -> dict[str, Any]:
        """Peak memory and the final evaluation's expert loads (L, E) for the report."""
        record: dict[str, Any] = {"peak_memory_bytes": peak_memory_bytes(self.device)}
        if self.last_eval_expert_counts_LE is not None:
            record["expert_counts"] = self.last_eval_expert_counts_LE.tolist()
        return record

    def close(self) -> None:
        """Close the dashboards and release the process group if this trainer created it."""
        self.loggers.close()
        self.dist.close()
