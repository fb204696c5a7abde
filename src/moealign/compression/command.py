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
import contextlib
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from moealign.compression.compress import METHODS, compress_model
from moealign.compression.layers import CompressionError, moe_layer_views
from moealign.compression.retention import inference_tokens_per_s, retention, retention_table
from moealign.config import MAX_CALIBRATION_TOKENS, MAX_EXPERTS, MAX_WIDTH, CompressionConfig
from moealign.io import read_json
from moealign.progress import phase
from moealign.tables import to_text
from moealign.training.preflight import check_writable_folder
from moealign.training.runs import RunLock

TRAINING_DATA = "training data"


def _check_arguments(args: argparse.Namespace) -> None:
    if args.method not in METHODS:
        raise CompressionError(f"--method {args.method!r} is not accepted; choose one of {METHODS}")
    for flag, value, most in (
        ("--keep-experts", args.keep_experts, MAX_EXPERTS),
        ("--calib-tokens", args.calib_tokens, MAX_CALIBRATION_TOKENS),
    ):
        if not 1 <= value <= most:
            raise CompressionError(
                f"{flag} {value} is not accepted; expected an integer from 1 to {most:,}"
            )
    if not 0 <= args.seed < 2**32:
        raise CompressionError(
            f"--seed {args.seed} is not accepted; expected an integer from 0 to {2**32 - 1}"
        )
    if args.rank is not None and (args.method != "submoe" or not 1 <= args.rank <= MAX_WIDTH):
        raise CompressionError(
            f"--rank {args.rank} is not accepted; expected an integer from 1 to {MAX_WIDTH:,} "
            "with --method submoe"
        )
    if args.calib is not None and not Path(args.calib).is_file():
        raise CompressionError(f"--calib {args.calib}: no such file")
    check_writable_folder(args.out, "--out", writes="compress")
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
        data = read_json(config)
    except (OSError, ValueError) as error:
        reason = " ".join(str(error).split())
        raise CompressionError(f"SOURCE {config}: {reason}; {accepted}") from None
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


def _check_rank(model, rank: int | None) -> None:
    """A Sub-MoE rank no larger than the experts of one group stacked can have: n·max(F, D)."""
    if rank is None:
        return
    views = moe_layer_views(model)
    most = max(view.n_experts * max(view.weights.gate.shape[1:]) for view in views)
    if rank > most:
        raise CompressionError(
            f"--rank {rank} is not accepted; expected at most {most} (the largest rank the "
            "model's stacked expert matrices can have)"
        )


def compress_source(
    source, out: Path, record: CompressionConfig, original: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Compress an opened source (:class:`~moealign.compression.runs.RunSource` or
    :class:`~moealign.compression.hf_models.HFSource`) as ``record`` says, evaluate the original
    (unless its metrics are given) and the compressed model, write ``out`` and return the
    report: ``compression`` (method, groups, ...), ``original``, ``compressed``, ``retention``.
    CompressionError (before anything is written) for what the source cannot do."""
    n_experts = _check_experts(source.model, record.keep_experts)
    _check_rank(source.model, record.rank)
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
        # A run is read under a shared lock: its training cannot rotate the checkpoint away.
        shared = source_kind(args.source) == "run"
        with RunLock(args.source, shared=True) if shared else contextlib.nullcontext():
            return _compress(args)
    except CompressionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _compress(args: argparse.Namespace) -> int:
    """Open, compress and write (after :func:`_check_arguments`)."""
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
    summary = report["compression"]
    print(f"{args.method}: {summary['n_experts']} -> {args.keep_experts} experts per MoE layer")
    print(to_text(retention_table(report)))
    print(f"written to {args.out}")
    return 0
