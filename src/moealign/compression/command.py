"""``moealign compress SOURCE --method M --keep-experts E′ --out DIR``: expert pruning or
merging of a moealign run (:mod:`moealign.compression.runs`) or a Hugging Face MoE model
directory (:mod:`moealign.compression.hf_models`), with a retention report
(:mod:`moealign.compression.retention`).

Every argument is checked before any work: the method, E′ (top_k ≤ E′ < E), the calibration
file, the token count, the rank, SOURCE (a run directory: ``config.json`` with model/train
sections and a checkpoint; a Hugging Face directory: ``config.json`` with a ``model_type``) and
DIR (must not exist). A bad one is one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from moealign.compression.compress import METHODS, compress_model
from moealign.compression.layers import CompressionError, moe_layer_views
from moealign.compression.retention import inference_tokens_per_s, retention, retention_table
from moealign.config import CompressionConfig
from moealign.progress import phase
from moealign.tables import to_text

TRAINING_DATA = "training data"


def _check_arguments(args: argparse.Namespace) -> None:
    if args.method not in METHODS:
        raise CompressionError(f"--method {args.method!r} is not accepted; choose one of {METHODS}")
    for flag, value in (
        ("--keep-experts", args.keep_experts),
        ("--calib-tokens", args.calib_tokens),
    ):
        if value < 1:
            raise CompressionError(f"{flag} {value} is not accepted; expected an integer >= 1")
    if args.rank is not None and (args.method != "submoe" or args.rank < 1):
        raise CompressionError(
            f"--rank {args.rank} is not accepted; expected an integer >= 1 with --method submoe"
        )
    if args.calib is not None and not Path(args.calib).is_file():
        raise CompressionError(f"--calib {args.calib}: no such file")
    if Path(args.out).exists():
        raise CompressionError(f"--out {args.out} already exists; give a new directory")


def source_kind(path: str | Path) -> str:
    """``run`` or ``hf`` by the directory's ``config.json`` (CompressionError otherwise)."""
    config = Path(path) / "config.json"
    accepted = (
        "expected a moealign run directory (config.json with model and train sections, and "
        "checkpoints/) or a Hugging Face model directory (config.json with a model_type)"
    )
    if not config.is_file():
        raise CompressionError(f"SOURCE {path} has no config.json; {accepted}")
    try:
        data = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CompressionError(f"SOURCE {config} is not valid JSON ({error}); {accepted}") from None
    if isinstance(data, dict) and "model_type" in data:
        return "hf"
    if isinstance(data, dict) and {"model", "train"} <= data.keys():
        return "run"
    raise CompressionError(f"SOURCE {path} is neither kind of directory; {accepted}")


def _open_source(path: str, device: str):
    if source_kind(path) == "hf":
        from transformers.utils import logging as transformers_logging

        from moealign.compression.hf_models import HFSource

        transformers_logging.disable_progress_bar()  # stderr keeps to results and errors
        return HFSource.open(path, device)
    from moealign.compression.runs import RunSource

    return RunSource.open(path, device)


def _check_experts(model, keep_experts: int) -> int:
    """E, after checking top_k <= E′ < E."""
    views = moe_layer_views(model)
    n_experts, top_k = views[0].n_experts, max(view.top_k for view in views)
    if not top_k <= keep_experts < n_experts:
        raise CompressionError(
            f"--keep-experts {keep_experts} is not accepted; expected top_k={top_k} <= E' < "
            f"E={n_experts} (the model's experts per MoE layer)"
        )
    return n_experts


def compress_source(
    source, out: Path, record: CompressionConfig, original: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Compress an opened source (:class:`~moealign.compression.runs.RunSource` or
    :class:`~moealign.compression.hf_models.HFSource`) as ``record`` says, evaluate the original
    (unless its metrics are given) and the compressed model, write ``out`` and return the
    report: ``compression`` (method, groups, ...), ``original``, ``compressed``, ``retention``.
    CompressionError (before anything is written) for what the source cannot do."""
    n_experts = _check_experts(source.model, record.keep_experts)
    calib = None if record.calibration == TRAINING_DATA else Path(record.calibration)
    if source.needs_calibration_file and calib is None:
        raise CompressionError(
            "--calib is required for a Hugging Face model (it has no training data of its "
            "own): give a .txt file or a .jsonl file with a 'text' field"
        )
    source.prepare(out, replace(record, source_n_experts=n_experts))
    try:
        batches = source.calibration_batches(calib, record.calibration_tokens)
    except ValueError as error:  # an unreadable file, or no tokens in it
        raise CompressionError(f"--calib {calib}: {error}") from None
    with phase(f"compress: {record.method} on {len(batches)} calibration batches"):
        result = compress_model(
            source.model,
            record.method,
            record.keep_experts,
            batches,
            seed=record.seed,
            rank=record.rank,
        )
    with phase("compress: evaluate the original and the compressed model", 2) as evaluated:
        original = dict(source.evaluate(source.model) if original is None else original)
        evaluated.update()
        compressed = source.evaluate(result.model)
        evaluated.update()
    with phase("compress: time inference"):
        speeds = inference_tokens_per_s([source.model, result.model], source.timing_batches)
    original["tokens_per_s"], compressed["tokens_per_s"] = speeds
    report = {
        "compression": result.summary(),
        "original": original,
        "compressed": compressed,
        "retention": retention(original, compressed),
    }
    source.write(out, result, report)
    return report


def run_compress(args: argparse.Namespace) -> int:
    """``moealign compress``: check, compress, write DIR, print the retention table."""
    try:
        _check_arguments(args)
        with phase("compress: load the model"):
            source = _open_source(args.source, args.device)
        record = CompressionConfig(
            method=args.method,
            source=str(Path(args.source).resolve()),
            keep_experts=args.keep_experts,
            calibration=str(Path(args.calib).resolve()) if args.calib else TRAINING_DATA,
            calibration_tokens=args.calib_tokens,
            seed=args.seed,
            rank=args.rank,
        )
        report = compress_source(source, Path(args.out), record)
    except CompressionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    summary = report["compression"]
    print(f"{args.method}: {summary['n_experts']} -> {args.keep_experts} experts per MoE layer")
    print(to_text(retention_table(report)))
    print(f"written to {args.out}")
    return 0
