"""``moealign compress`` on a Hugging Face model directory (transformers MoE, softmax family).

The model is read with ``AutoModelForCausalLM.from_pretrained`` (its stored dtype) and its
tokenizer with ``AutoTokenizer.from_pretrained``. A Hugging Face model carries no training
data, so ``--calib FILE`` is required: its first N tokens (windows of min(256,
max_position_embeddings) tokens, 8 windows per batch) calibrate, and up to N following tokens
are the held-out text of the retention report's perplexity (none left: no perplexity).

The output directory is what ``save_pretrained`` writes for the compressed model (its config
says ``num_experts``/``num_local_experts`` = E′ and records the compression under
``moealign_compression``, which transformers carries along and otherwise ignores), the source's
tokenizer files and ``compression.json``. Plain ``AutoModelForCausalLM.from_pretrained``
reloads it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moealign.compression.compress import CompressionResult
from moealign.compression.data import Batch, text_batches
from moealign.compression.layers import moe_layer_views
from moealign.compression.retention import lm_metrics
from moealign.compression.runs import REPORT_FILE
from moealign.config import CompressionConfig
from moealign.data.batching import IGNORE_INDEX
from moealign.distributed.context import resolve_device
from moealign.evaluation.common import strict_json
from moealign.evaluation.lm import evaluate_lm
from moealign.io import atomic_directory, atomic_write_json, naming_file

MAX_WINDOW = 256
WINDOWS_PER_BATCH = 8


@dataclass
class HFSource:
    """A transformers MoE model directory opened for compression."""

    path: Path
    model: nn.Module
    tokenizer: Any
    held_out: list[Batch] = field(default_factory=list)
    timing_batches: list[Batch] = field(default_factory=list)
    record: CompressionConfig | None = None

    needs_calibration_file = True

    @classmethod
    def open(cls, path: str | Path, device: str = "auto") -> HFSource:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from moealign.integrations.locations import pretrained_location

        path = pretrained_location(path, "SOURCE")
        with naming_file("SOURCE", path):
            model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
        model = model.to(resolve_device(device)).eval()
        moe_layer_views(model)  # an unsupported family or router fails here, before any work
        with naming_file("the tokenizer (it tokenises the --calib text) of SOURCE", path):
            tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(Path(path), model, tokenizer)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prepare(self, out: Path, record: CompressionConfig) -> None:
        """Remember what the compressed model's config will record."""
        self.record = record

    def calibration_batches(self, calib: Path, n_tokens: int) -> list[Batch]:
        """The first ``n_tokens`` tokens of ``calib``; the next ones become :attr:`held_out`."""
        window = min(MAX_WINDOW, self.model.config.max_position_embeddings)
        calibration, held_out = text_batches(
            calib, self._encode, window, WINDOWS_PER_BATCH, n_tokens, n_tokens
        )
        self.held_out = [b for b in held_out if bool((b["labels"] != IGNORE_INDEX).any())]
        self.timing_batches = self.held_out or calibration  # tokens/s: held-out text if any
        return calibration

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """Perplexity on the held-out text (if any) and the parameter count."""
        evaluation = evaluate_lm(model, self.held_out).record("val_") if self.held_out else {}
        return {
            **lm_metrics(evaluation),
            "params_total": sum(p.numel() for p in model.parameters()),
            "params_active": None,
        }

    def write(self, out: Path, result: CompressionResult, report: dict) -> None:
        """save_pretrained + tokenizer + compression.json (:meth:`prepare` first), assembled in
        a temporary sibling directory and renamed into place."""
        with atomic_directory(out) as tmp:
            result.model.config.moealign_compression = asdict(self.record)
            with torch.no_grad():
                result.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            atomic_write_json(tmp / REPORT_FILE, strict_json(report))
