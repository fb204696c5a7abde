"""Evaluate a finished (or interrupted) run from its directory: ``moealign eval RUN_DIR``.

Rebuilds the model and data from the run's recorded ``config.json``, loads its newest good
checkpoint and measures validation loss/perplexity with routing statistics over the whole
validation set (MaxVio global, DESIGN.md §4), greedy answers on the task suite's evaluation
sets (per-task accuracy, BLEU/ROUGE-L for generation tasks) and the projection alignment.
The result is written to ``RUN_DIR/eval.json`` (atomically) and returned.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moealign.config import RunConfig, build_config
from moealign.data.build import TrainingData, build_training_data
from moealign.distributed.context import resolve_device
from moealign.evaluation.diagnostics import routing_projection_alignment
from moealign.evaluation.lm import evaluate_lm
from moealign.evaluation.tasks import evaluate_suite
from moealign.nn.transformer import MoETransformer
from moealign.training.checkpoint import Checkpoint, CheckpointError, load_latest

EVAL_FILE = "eval.json"


def load_run_config(run_dir: str | Path) -> RunConfig:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a run directory: it has no config.json")
    return build_config(RunConfig, json.loads(path.read_text()))


def load_run_model(
    run_dir: str | Path, device: str = "auto"
) -> tuple[RunConfig, MoETransformer, Checkpoint]:
    """The run's config, its model with the newest good checkpoint's weights, and that
    checkpoint."""
    config = load_run_config(run_dir)
    checkpoint = load_latest(Path(run_dir) / "checkpoints", fallback=True)
    if checkpoint is None:
        raise CheckpointError(f"{run_dir} holds no checkpoint to evaluate")
    model = MoETransformer(config.model).to(resolve_device(device))
    checkpoint.load_model(model)
    return config, model, checkpoint


def evaluate_model(
    model: MoETransformer,
    data: TrainingData,
    task_examples: int,
    task_sets: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Validation loss with routing statistics over ``data.validation``, the projection
    alignment per MoE layer, and greedy answers on ``task_examples`` examples per task and
    evaluation set of the task suite (when the data has one and ``task_examples`` > 0; only
    the sets ``task_sets``, default all)."""
    result: dict[str, Any] = {"lm": evaluate_lm(model, data.validation)}
    if model.moe_layers:
        result["projection_alignment"] = routing_projection_alignment(model)
    if data.suite is not None and task_examples > 0:
        result["tasks"] = evaluate_suite(
            model,
            data.tokenizer,
            data.suite,
            max_examples_per_task=task_examples,
            sets=task_sets,
        )
    return result


def evaluate_run(
    run_dir: str | Path,
    task_examples: int | None = None,
    eval_batches: int | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Evaluate the run in ``run_dir``; ``task_examples`` per task and set (None = the run's
    ``train.task_eval_examples``), ``eval_batches`` validation batches (None = the run's)."""
    config, model, _ = load_run_model(run_dir, device)
    if eval_batches is not None:
        config.train.eval_batches = eval_batches
    data = build_training_data(config)
    limit = config.train.task_eval_examples if task_examples is None else task_examples
    result = evaluate_model(model, data, limit)
    path = Path(run_dir) / EVAL_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return result


def summary_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """Terminal summary of :func:`evaluate_run`'s result."""
    lm = result["lm"]
    rows = [("val loss", f"{lm['nll']:.4f}"), ("val perplexity", f"{lm['perplexity']:.2f}")]
    if "max_violation_global" in lm:
        rows.append(
            ("MaxVio (global, mean over layers)", f"{_mean(lm['max_violation_global']):.3f}")
        )
        rows.append(("dead experts (mean over layers)", f"{_mean(lm['dead_experts']):.2f}"))
    if "projection_alignment" in result:
        values = ", ".join(f"{v:.2f}" for v in result["projection_alignment"])
        rows.append(("projection alignment per layer", values))
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


def _mean(values: list[float] | float) -> float:
    return sum(values) / len(values) if isinstance(values, list) else float(values)
