"""``moealign compress`` on a moealign run directory: the source, and the compressed run it
writes.

The compressed run is an ordinary run directory (DESIGN.md §8): ``config.json`` is the
source's config with ``model.n_experts`` = E′ after pruning (MPI: the adjusted
``router_options.c_prime``) or ``model.merged_experts`` = E′ after merging (R2: the E router
rows stay; :mod:`moealign.compression.apply`), ``name``/``out_dir`` of the new directory and a
``compression`` section (method, source, E, E′, calibration, seed, rank); ``meta.json`` the
provenance of this command; ``checkpoints/step_N`` one checkpoint at the source's step N; and
``compression.json`` the groups and the retention report. ``moealign eval DIR`` evaluates it
and ``moealign train --resume --out DIR --set train.steps=M`` continues its training.

The checkpoint's trainer state is the source's (scheduler, data stream, RNG, token count,
guardrail), so training continues where the source stopped, except:

* the optimizer keeps its parameter groups (learning rates, betas) but its per-parameter state
  (moments) starts empty: the expert tensors changed shape, and merged experts have no moments;
* after merging (R2) routing stays over the E router rows and a routing-alignment prior is
  kept as it was; after pruning a prior (L, E) becomes (L, E′): ``uniform`` is 1/E′;
  ``marginal`` (and the tensor of a ``file`` prior, written as
  ``alignment_prior.safetensors`` in the new run, which the config then names) gives each
  new expert its group's mass, q′_G = Σ_{e∈G} q_e, renormalised over the kept groups.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from moealign.compression.apply import R1, R2, compressed_model_config
from moealign.compression.compress import MERGING_METHODS, CompressionResult
from moealign.compression.data import Batch, stream_batches, text_batches
from moealign.compression.retention import lm_metrics
from moealign.config import AlignmentConfig, CompressionConfig, RunConfig
from moealign.data.build import TrainingData, build_training_data
from moealign.evaluation.common import autocast_dtype, model_device, strict_json
from moealign.evaluation.lm import evaluate_lm
from moealign.evaluation.run import evaluation_record, load_run_checkpoint
from moealign.evaluation.tasks import HELDOUT_SETS
from moealign.io import atomic_directory, atomic_write_json
from moealign.nn.transformer import MoETransformer
from moealign.training.checkpoint import Checkpoint, save_checkpoint
from moealign.training.runs import TOKENIZER_DIR, RunDirectory, run_identity

REPORT_FILE = "compression.json"
PRIOR_FILE = "alignment_prior.safetensors"
RETENTION_TASK_SETS = ("test", *HELDOUT_SETS)


def compress_distribution(q_LE: Tensor, groups: list[list[tuple[int, ...]]]) -> Tensor:
    """q′_G = Σ_{e∈G} q_e per layer, renormalised (float64), (L, E′)."""
    q_LE = torch.as_tensor(q_LE, dtype=torch.float64)
    rows = [
        torch.stack([q_LE[layer, list(group)].sum() for group in layer_groups])
        for layer, layer_groups in enumerate(groups)
    ]
    q_new = torch.stack(rows)
    return q_new / q_new.sum(-1, keepdim=True)


def compressed_trainer_state(
    state: dict[str, Any], groups: list[list[tuple[int, ...]]]
) -> dict[str, Any]:
    """The source checkpoint's trainer state for the compressed run (module docstring)."""
    state = copy.deepcopy(state)
    n_layers, n_experts = len(groups), len(groups[0])
    for term in state["aux_terms"]:
        prior = term.get("prior") if isinstance(term, dict) else None
        if prior is None:
            continue
        if prior["kind"] == "uniform":
            prior["value"] = torch.full((n_layers, n_experts), 1.0 / n_experts, dtype=torch.float64)
        else:
            prior["value"] = compress_distribution(prior["value"], groups)
    return state


@dataclass
class RunSource:
    """A moealign run directory opened for compression: its config, its model with the newest
    checkpoint's weights, that checkpoint and its data (for calibration and evaluation)."""

    path: Path
    config: RunConfig
    model: MoETransformer
    checkpoint: Checkpoint
    data: TrainingData
    output_config: RunConfig | None = None

    needs_calibration_file = False

    @classmethod
    def open(cls, path: str | Path, device: str = "auto") -> RunSource:
        config, model, checkpoint = load_run_checkpoint(path, device)
        return cls(Path(path), config, model.eval(), checkpoint, build_training_data(config))

    def __post_init__(self) -> None:
        self._stream_start = self.data.train.state_dict()

    @property
    def timing_batches(self) -> list[Batch]:
        """The batches that inference tokens/s is measured on: the validation batches."""
        return self.data.validation

    def calibration_batches(self, calib: Path | None, n_tokens: int) -> list[Batch]:
        """The first ``n_tokens`` real tokens of the run's training stream (from its start:
        the batches of the run's first steps), or of the text file ``calib`` tokenised with
        the run's tokenizer in windows of ``train.seq_len``."""
        tokenizer = self.data.tokenizer
        if calib is None:
            self.data.train.load_state_dict(self._stream_start)  # every call: the same tokens
            return stream_batches(self.data.train, tokenizer.pad_id, n_tokens)
        train = self.config.train
        return text_batches(calib, tokenizer.encode, train.seq_len, train.batch_size, n_tokens)[0]

    def evaluate(self, model: MoETransformer) -> dict[str, Any]:
        """Validation loss, task accuracies on the seen-task test split and the held-out sets
        (``train.task_eval_examples`` per task and set, as ``moealign eval``; the long-length
        set, which the report does not use, is left out) and parameter counts."""
        train = self.config.train
        dtype = autocast_dtype(train.precision, model_device(model))
        lm = evaluate_lm(model, self.data.validation, autocast_dtype=dtype)
        evaluation = evaluation_record(
            model, lm, self.data, train.task_eval_examples, dtype, RETENTION_TASK_SETS
        )
        counts = model.parameter_counts()
        return {
            **lm_metrics(evaluation),
            "params_total": counts["total"],
            "params_active": counts["active"],
        }

    def prepare(self, out: Path, record: CompressionConfig) -> None:
        """Build the compressed run's config for ``out`` before any work (a ConfigError names a
        field that E′ breaks, e.g. ``train.ep_size``)."""
        alignment = self.config.alignment
        if alignment.prior == "file":
            alignment = replace(alignment, prior_path=str((out / PRIOR_FILE).resolve()))
        self.output_config = replace(
            self.config,
            model=compressed_model_config(
                self.model, record.keep_experts, R2 if record.method in MERGING_METHODS else R1
            ),
            alignment=alignment,
            compression=record,
            name=out.name,
            out_dir=str(out.parent),
        )

    def write(self, out: Path, result: CompressionResult, report: dict[str, Any]) -> None:
        """Write the compressed run to ``out`` (module docstring; :meth:`prepare` first):
        assembled in a temporary sibling directory and renamed into place, so ``out`` is
        complete or absent."""
        config = self.output_config
        with atomic_directory(out) as tmp:
            device = next(result.model.parameters()).device
            run = RunDirectory.open(
                tmp, config.to_dict(), seed=config.train.seed, device=str(device)
            )
            optimizer = {
                "state": {},
                "param_groups": self.checkpoint.optimizer_state()["param_groups"],
            }
            # Under R2 routing stays over the E original rows: the prior keeps its E entries.
            prior_groups = (
                [[(e,) for e in range(len(layer_map))] for layer_map in _r2_maps(result)]
                if result.router_update == R2
                else result.groups
            )
            trainer_state = compressed_trainer_state(self.checkpoint.trainer_state, prior_groups)
            trainer_state["identity"] = run_identity(config.to_dict())  # the new run's own
            save_checkpoint(
                run.checkpoint_dir,
                self.checkpoint.step,
                result.model,
                optimizer,
                trainer_state,
                keep=config.train.keep_checkpoints,
            )
            if config.alignment.prior == "file":
                _write_prior(self.config.alignment, tmp / PRIOR_FILE, prior_groups)
            atomic_write_json(tmp / REPORT_FILE, strict_json(report))
            self.data.tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
            run.update_meta(compression=result.summary(), source_step=self.checkpoint.step)
            run.close()  # the lock file goes with the folder; nothing holds it any more


def _r2_maps(result: CompressionResult) -> list[Tensor]:
    return [layer.expert_map for layer in result.model.moe_layers]


def _write_prior(alignment: AlignmentConfig, path: Path, groups: list) -> None:
    prior = load_file(alignment.prior_path)["prior"]
    save_file({"prior": compress_distribution(prior, groups).contiguous()}, str(path))
