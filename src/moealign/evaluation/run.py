"""Evaluate a finished (or interrupted) run from its directory: ``moealign eval RUN_DIR``.

Rebuilds the model and data from the run's recorded ``config.json``, loads its newest good
checkpoint and evaluates it as the trainer does at the end of a run (the same function, the
same precision, the same layout as ``final_eval.json``): validation loss/perplexity with routing
statistics over the validation set (MaxVio global, DESIGN.md §4) and the projection alignment,
and greedy answers on the task suite's evaluation sets (per-task accuracy, BLEU/ROUGE-L for
generation tasks). The result is written to ``RUN_DIR/eval.json`` (atomically, strict JSON)
and returned.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from moealign.config import ConfigError, RunConfig
from moealign.data.build import TrainingData, build_training_data
from moealign.distributed.context import resolve_device
from moealign.evaluation.common import autocast, autocast_dtype, model_device, strict_json
from moealign.evaluation.lm import LMEvaluation, evaluate_lm
from moealign.evaluation.tasks import suite_record
from moealign.io import atomic_write_json
from moealign.nn.transformer import MoETransformer
from moealign.progress import phase, track
from moealign.training.checkpoint import Checkpoint, CheckpointError, load_latest
from moealign.training.runs import EVAL_FILE, read_run_config


def load_run_checkpoint(
    run_dir: str | Path, device: str = "auto"
) -> tuple[RunConfig, MoETransformer, Checkpoint]:
    """The run's config, its model with the newest checkpoint whose weights load, and that
    checkpoint."""
    config = read_run_config(run_dir)
    model = MoETransformer(config.model).to(resolve_device(device))

    def load_finite(checkpoint: Checkpoint) -> None:
        checkpoint.load_model(model)
        bad = [name for name, p in model.state_dict().items() if not torch.isfinite(p).all()]
        if bad:
            raise CheckpointError(
                f"checkpoint {checkpoint.path} holds non-finite weights (NaN or inf in "
                f"{', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})"
            )

    checkpoint = load_latest(Path(run_dir) / "checkpoints", fallback=True, apply=load_finite)
    if checkpoint is None:
        raise CheckpointError(f"{run_dir} holds no checkpoint to evaluate")
    return config, model, checkpoint


def load_run_model(run_dir: str | Path, device: str = "auto") -> tuple[RunConfig, MoETransformer]:
    """The run's config and its model with the newest checkpoint whose weights load."""
    config, model, _ = load_run_checkpoint(run_dir, device)
    return config, model


def evaluation_record(
    model: MoETransformer,
    lm: LMEvaluation,
    data: TrainingData,
    task_examples: int,
    dtype: torch.dtype | None,
    task_sets: Sequence[str] | None = None,
) -> dict[str, Any]:
    """A run's evaluation in the layout of ``final_eval.json`` and ``eval.json``: the
    validation record of ``lm`` (``val_loss``, ``val_ppl``, ``val_tokens``,
    ``val_routing/...`` with the projection alignment of ``model``), ``expert_counts`` (L × E)
    and, with a task suite and ``task_examples`` > 0, the task results
    (:func:`~moealign.evaluation.tasks.suite_record`, answers generated under the same
    autocast to ``dtype`` as training; only the evaluation sets ``task_sets``, default all)."""
    if lm.routing is not None and lm.routing.projection_alignment is None:
        lm.routing.with_projection_alignment(model)
    record: dict[str, Any] = lm.record("val_")
    if lm.routing is not None:
        record["expert_counts"] = lm.routing.expert_counts.round().long().tolist()
    if data.suite is not None and task_examples > 0:
        with autocast(model_device(model), dtype):
            record |= suite_record(model, data.tokenizer, data.suite, task_examples, task_sets)
    return record


def evaluate_run(
    run_dir: str | Path,
    task_examples: int | None = None,
    eval_batches: int | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Evaluate the run in ``run_dir``; ``task_examples`` per task and set (None = the run's
    ``train.task_eval_examples``), ``eval_batches`` validation batches (None = the run's). The
    evaluation is the trainer's own (:func:`~moealign.evaluation.lm.evaluate_lm` in the run's
    ``train.precision``), so the newest checkpoint's ``val_loss`` equals the run's when it was
    taken at that step. Raises :class:`ConfigError` for a bad count before loading anything."""
    for name, value, least in (
        ("--eval-batches", eval_batches, 1),
        ("--task-examples", task_examples, 0),
    ):
        if value is not None and not (isinstance(value, int) and value >= least):
            raise ConfigError(name, f"got {value!r}; expected an integer >= {least}")
    with phase("eval: load the checkpoint"):
        config, model = load_run_model(run_dir, device)
    if eval_batches is not None:
        config.train.eval_batches = eval_batches
    with phase("eval: build the data"):
        data = build_training_data(config)
    limit = config.train.task_eval_examples if task_examples is None else task_examples
    dtype = autocast_dtype(config.train.precision, model_device(model))
    batches = track(data.validation, "eval: validation batches")
    lm = evaluate_lm(model, batches, autocast_dtype=dtype)
    result = evaluation_record(model, lm, data, limit, dtype)
    atomic_write_json(Path(run_dir) / EVAL_FILE, strict_json(result))
    return result


def summary_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """Terminal summary of :func:`evaluate_run`'s result."""
    rows = [
        ("val loss", f"{result['val_loss']:.4f}"),
        ("val perplexity", f"{result['val_ppl']:.2f}"),
    ]
    if "val_routing/max_vio" in result:
        rows.append(("MaxVio (global, mean over layers)", f"{result['val_routing/max_vio']:.3f}"))
        rows.append(
            ("dead experts (mean over layers)", f"{result['val_routing/dead_experts']:.2f}")
        )
        layers = sorted(
            (int(key.split("/")[1].removeprefix("layer")), value)
            for key, value in result.items()
            if key.startswith("val_routing/layer") and key.endswith("/projection_alignment")
        )
        rows.append(("projection alignment per layer", ", ".join(f"{v:.2f}" for _, v in layers)))
    tasks = result.get("tasks")
    if tasks:
        rows.append(("task accuracy (seen, test split)", f"{tasks['seen_mean']:.3f}"))
        if tasks["heldout_mean"] is not None:
            rows.append(("task accuracy (held out)", f"{tasks['heldout_mean']:.3f}"))
        for set_name, evaluation in tasks["sets"].items():
            for task, scores in sorted(evaluation["tasks"].items()):
                extra = ""
                if scores.get("bleu") is not None:
                    extra = f"  BLEU {scores['bleu']:.1f}  ROUGE-L {scores['rouge_l']:.3f}"
                rows.append((f"  {set_name}/{task}", f"{scores['accuracy']:.3f}{extra}"))
    return rows
