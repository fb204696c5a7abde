"""A trainer's state: its whole model, what a checkpoint holds, saving it and resuming from it
(DESIGN.md §8, §9).

A checkpoint (:mod:`moealign.training.checkpoint`) holds the whole model and optimizer state and
the trainer state: the scheduler, the RNGs, the data stream, the tokens seen, each loss term's
state (:class:`~moealign.training.objective.Objective`) and the guardrail's. Sharded runs gather
whole tensors on rank 0 to save and re-shard on load, so a run resumes at any world size.
:func:`save_state` never writes a tensor holding a NaN or an infinity: such a state is logged
as an event instead, so checkpoint rotation always keeps the last finite checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moealign.nn.transformer import MoETransformer
from moealign.training import checkpoint
from moealign.training.runs import run_identity

if TYPE_CHECKING:
    from moealign.training.trainer import Trainer

__all__ = [
    "nonfinite_tensors",
    "restore_state",
    "save_state",
    "trainer_state",
    "whole_model",
    "whole_model_copy",
]

log = logging.getLogger(__name__)


def whole_model_copy(trainer: Trainer) -> MoETransformer:
    """A fresh unsharded model of the run's architecture (its RNG draws do not count)."""
    with torch.random.fork_rng(devices=[]):
        return MoETransformer(trainer.config.model).to(trainer.device)


def whole_model(trainer: Trainer) -> torch.nn.Module | None:
    """``trainer``'s model with whole tensors: the model itself, or, when sharded, a copy
    gathered on rank 0 (None on the other ranks). A collective when sharded: call it on every
    rank."""
    if not trainer.parallel.shards:
        return trainer.model
    state = trainer.parallel.full_model_state(trainer.model)
    if not trainer.dist.is_main:
        return None
    whole = whole_model_copy(trainer)
    whole.load_state_dict(state)
    return whole.train(trainer.model.training)


def trainer_state(trainer: Trainer) -> dict[str, Any]:
    """Everything beyond the model and optimizer that a resumed run needs."""
    return {
        "scheduler": trainer.scheduler.state_dict(),
        "rng": checkpoint.capture_rng_state(),
        "data": trainer.data.train.state_dict(),
        "tokens_seen": trainer.tokens_seen,
        "aux_terms": trainer.objective.state_dict(),
        "guardrail": trainer.guardrail.state_dict() if trainer.guardrail else None,
        "identity": run_identity(trainer.config.to_dict()),
    }


def restore_state(trainer: Trainer) -> bool:
    """Load the newest checkpoint of ``trainer``'s run that loads and applies, falling back
    past any that fails (:func:`moealign.training.checkpoint.load_latest`); False when none
    does (the run starts from step 0)."""
    found = checkpoint.load_latest(
        trainer.checkpoint_dir, fallback=True, apply=lambda c: apply_checkpoint(trainer, c)
    )
    if found is None:
        log.warning("resume: no checkpoint in %s; starting from step 0", trainer.checkpoint_dir)
        return False
    log.info("resumed from %s at step %d", found.path, trainer.step)
    return True


def apply_checkpoint(trainer: Trainer, found: checkpoint.Checkpoint) -> None:
    """Load ``found`` into the trainer's model, optimizer, schedule, data order, loss terms,
    guardrail and random generators; raises on any mismatch, first on a checkpoint of another
    run (:func:`moealign.training.runs.run_identity` of another config or seed)."""
    identity = found.trainer_state.get("identity")  # absent in checkpoints older than it
    if identity is not None and identity != run_identity(trainer.config.to_dict()):
        raise checkpoint.CheckpointError(
            f"checkpoint {found.path} belongs to another run: it was written with another "
            "config or seed than this run's"
        )
    if trainer.parallel.shards:
        whole = whole_model_copy(trainer)
        found.load_model(whole)
        trainer.parallel.load_full_model_state(trainer.model, whole.state_dict())
        optimizer_state = found.optimizer_state()
        trainer.parallel.load_full_optimizer_state(
            trainer.model, trainer.optimizer, optimizer_state
        )
    else:
        found.load_model(trainer.model)
        found.load_optimizer(trainer.optimizer)
    state = found.trainer_state
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.data.train.load_state_dict(state["data"])
    try:
        trainer.objective.load_state_dict(state["aux_terms"])
    except ValueError as err:
        raise checkpoint.CheckpointError(f"checkpoint {found.path}: {err}") from None
    if trainer.guardrail is not None and state.get("guardrail") is not None:
        trainer.guardrail.load_state_dict(state["guardrail"])
    checkpoint.restore_rng_state(state["rng"])
    trainer.tokens_seen, trainer.step = state["tokens_seen"], found.step


def save_state(trainer: Trainer) -> Path | None:
    """Checkpoint ``trainer``'s current step (rank 0 writes; returns the directory there).
    Sharded runs gather whole tensors first, so every rank must call it. A state with a
    non-finite value is not written (an ``event`` record says which tensors)."""
    model: torch.nn.Module | None = trainer.model
    optimizer: Any = trainer.optimizer
    if trainer.parallel.shards:
        model = trainer.whole_model()
        optimizer = trainer.parallel.full_optimizer_state(trainer.model, trainer.optimizer)
    if not trainer.dist.is_main:
        return None
    optimizer_state = optimizer if isinstance(optimizer, Mapping) else optimizer.state_dict()
    bad = nonfinite_tensors(model.state_dict(), optimizer_state)
    if bad:
        log.error("step %d: not checkpointed, non-finite values in %s", trainer.step, bad[:5])
        event = {"event": "nonfinite", "action": "checkpoint not written", "values": bad}
        trainer.log({"step": trainer.step, **event})
        return None
    return checkpoint.save_checkpoint(
        trainer.checkpoint_dir,
        trainer.step,
        model,
        optimizer,
        trainer_state(trainer),
        keep=trainer.config.train.keep_checkpoints,
    )


def nonfinite_tensors(
    model_state: Mapping[str, Any], optimizer_state: Mapping[str, Any]
) -> list[str]:
    """Names of the floating-point model and optimizer tensors holding a NaN or an infinity
    (one device synchronisation when all are finite)."""
    tensors = dict(model_state)
    for index, state in optimizer_state.get("state", {}).items():
        tensors |= {f"optimizer/{index}/{k}": v for k, v in state.items() if torch.is_tensor(v)}
    floating = {k: v for k, v in tensors.items() if v.is_floating_point()}
    finite = [torch.isfinite(v).all() for v in floating.values()]
    if not finite or bool(torch.stack([f.cpu() for f in finite]).all()):
        return []
    return [name for name, ok in zip(floating, finite, strict=True) if not bool(ok)]
