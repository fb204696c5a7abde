"""The ``moealign`` command line.

Each subcommand is a pair of small functions — one adds its arguments, one runs it and returns
the exit status — registered in :data:`COMMANDS`. Arguments are declared here without importing
torch or matplotlib (``moealign --help`` and every ``moealign COMMAND --help`` stay fast); a
command imports what it needs when it runs.

Exit status: 0 done; 2 a problem with what the user asked for (config, arguments, files, a run
folder, a checkpoint, a full disk: any ``ValueError``, ``TypeError``, ``OSError`` or
safetensors error), printed as one line ``error: <message>`` on stderr; 1 an internal failure,
also one line; 130/143 any command stopped by SIGINT/SIGTERM, with one ``error:`` line (a
``train`` or ``ablate`` saves its state first; other commands leave what they had written
complete or absent: atomic writes). Running out of memory is exit 2 with one line too.
Tracebacks only with ``moealign --debug COMMAND ...``. Log messages below WARNING are
shown only for moealign's own loggers, unless ``--verbose``; every ``--help`` shows the options'
defaults.

Progress goes to stderr through :mod:`moealign.progress` (``--quiet`` on every command silences
it). The commands with ``json=True`` take ``--json``: :func:`_run` then sends what they print
to stderr and prints their returned document, alone, on stdout (docs/cli.md, docs/json.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from moealign import __version__
from moealign.config import MAX_BATCH, MAX_EVAL_BATCHES, MAX_EXAMPLES, MAX_SEQ_LEN

__all__ = ["COMMANDS", "Command", "HelpFormatter", "build_parser", "configure_logging", "main"]

SIGNAL_EXIT = {"SIGINT": 130, "SIGTERM": 143}  # 128 + the signal number, as a shell reports it


Document = dict[str, Any]


@dataclass(frozen=True)
class Command:
    """A subcommand: ``add_arguments(parser)`` declares its options, ``run(args)`` returns the
    exit status, or (a command with ``json=True``) its result as a JSON-ready document, which
    means exit status 0 and is what ``--json`` prints (:func:`main`; docs/json.md)."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | Document]
    json: bool = False


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: <prog>: <message>`` and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _int_at_least(minimum: int, maximum: int = 10**9) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"got {text!r}; expected an integer") from None
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(
                f"got {value}; expected an integer >= {minimum} and <= {maximum:,}"
            )
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _add_override_argument(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"{help}, e.g. --set model.n_experts=16 (repeatable)",
    )


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML config (default: built-in defaults)")
    _add_override_argument(parser, "override a config value")


def _format_table(rows: Sequence[tuple[str, str]]) -> str:
    from moealign.tables import Table, to_text

    return to_text(Table([], rows, align="ll"))


def _written(command: str, folder: str, files: dict[str, str], result_file: str) -> Document:
    """The ``--json`` document of a command that wrote ``files`` (role -> name in ``folder``):
    their paths, and as ``result`` the content of the JSON file ``files[result_file]`` (so the
    document holds exactly what the command wrote)."""
    from moealign.io import read_json

    paths = {role: str(Path(folder) / name) for role, name in files.items()}
    return {"command": command, "files": paths, "result": read_json(paths[result_file])}


# ---------------------------------------------------------------------------- train


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    _add_config_arguments(parser)
    parser.add_argument("--out", metavar="DIR", help="run directory (default: out_dir/name)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--resume",
        action="store_true",
        help="continue from the last checkpoint (without --config: the run's recorded config)",
    )
    mode.add_argument(
        "--overwrite", action="store_true", help="replace an existing run (only a moealign run)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _run_train(args: argparse.Namespace) -> int:
    from moealign.config import ConfigError, load_config
    from moealign.training.preflight import check_before_training
    from moealign.training.runs import (
        CONFIG_FILE,
        RunDirectory,
        RunExistsError,
        RunLock,
        finished_step,
    )

    if args.resume and args.out:  # before the config: the folder is what is wrong
        try:
            RunDirectory(Path(args.out)).check_resumable()
        except RunExistsError as err:
            raise ConfigError("--out", str(err)) from None
    config_path = args.config
    recorded = Path(args.out or "") / CONFIG_FILE
    if config_path is None and args.resume and args.out and recorded.is_file():
        config_path = recorded  # resume a run directory from its own record
    config = load_config(config_path, args.overrides)
    run_dir = Path(args.out) if args.out else config.run_dir
    check_before_training(config, run_dir, out_field="--out" if args.out else "out_dir")
    RunDirectory(run_dir).check(config.to_dict(), resume=args.resume, overwrite=args.overwrite)
    if args.resume and finished_step(run_dir) == config.train.steps:
        print(f"{run_dir} already finished at step {config.train.steps}; nothing to do")
        return 0
    # Refuse a concurrent run on an existing folder before building data and model.
    lock = RunLock(run_dir).acquire() if run_dir.is_dir() and _is_main_rank() else None
    try:
        return _train(config, run_dir, args)
    finally:
        if lock is not None:
            lock.release()


def _train(config, run_dir: Path, args: argparse.Namespace) -> int:
    from moealign.training.trainer import Trainer  # torch and the model load only when training

    trainer = Trainer(
        config,
        run_dir=run_dir,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    try:
        result = trainer.train()
    finally:
        trainer.close()
    if result.diverged_at is not None:  # train.on_nonfinite = "stop"
        if trainer.dist.is_main:
            print(
                f"error: training diverged at step {result.diverged_at} (non-finite loss or "
                f"gradient); the last finite checkpoint is kept in {result.run_dir}/checkpoints "
                "(set train.on_nonfinite=skip to skip such steps)",
                file=sys.stderr,
            )
        return 1
    status = SIGNAL_EXIT.get(result.stop_signal or "", 0) if result.interrupted else 0
    if not trainer.dist.is_main:
        return status
    if status:
        print(
            f"error: interrupted by {result.stop_signal} at step {result.step} after saving a "
            f"checkpoint; continue with --resume --out {result.run_dir}",
            file=sys.stderr,
        )
    counts = trainer.parameter_counts
    train, final = result.last_train, result.final_eval
    rows = [
        ("run directory", str(result.run_dir)),
        ("steps", f"{result.step} / {config.train.steps}"),
        ("status", "interrupted (continue with --resume)" if result.interrupted else "finished"),
        ("parameters (total / active)", f"{counts['total']:,} / {counts['active']:,}"),
    ]
    if train:
        rows += [
            ("train loss", f"{train['loss']:.4f}"),
            ("train tokens/s", f"{train['tokens_per_s']:,.0f}"),
        ]
    if final:
        rows += [
            ("val loss", f"{final['val_loss']:.4f}"),
            ("val perplexity", f"{final['val_ppl']:.2f}"),
        ]
        if "val_routing/max_vio" in final:
            rows += [
                ("val MaxVio (global)", f"{final['val_routing/max_vio']:.3f}"),
                ("val dead experts / layer", f"{final['val_routing/dead_experts']:.2f}"),
            ]
    print(_format_table(rows))
    return status


# ---------------------------------------------------------------------------- eval


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory of `moealign train`")
    parser.add_argument(
        "--task-examples",
        type=_int_at_least(0, MAX_EXAMPLES),
        default=None,
        metavar="N",
        help="examples per task and evaluation set (default: the run's train.task_eval_examples)",
    )
    parser.add_argument(
        "--eval-batches",
        type=_int_at_least(1, MAX_EVAL_BATCHES),
        default=None,
        metavar="N",
        help="validation batches (default: the run's train.eval_batches)",
    )
    parser.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to evaluate"
    )


def _check_run_argument(path: str, field: str) -> None:
    """One clear line for a folder that holds no run or whose recorded config is bad."""
    from moealign.config import ConfigError
    from moealign.training.runs import CONFIG_FILE, read_run_config

    if not (Path(path) / CONFIG_FILE).is_file():
        raise ConfigError(field, f"got {path!r}, which holds no run (no {CONFIG_FILE})")
    read_run_config(path)


def _run_eval(args: argparse.Namespace) -> Document:
    from moealign.training.preflight import check_device
    from moealign.training.runs import RunLock

    check_device(args.device, "--device")
    _check_run_argument(args.run_dir, "RUN_DIR")
    with RunLock(args.run_dir):
        from moealign.evaluation.run import EVAL_FILE, evaluate_run, summary_rows

        result = evaluate_run(args.run_dir, args.task_examples, args.eval_batches, args.device)
    print(_format_table(summary_rows(result)))
    print(f"written to {Path(args.run_dir) / EVAL_FILE}")
    return _written("eval", args.run_dir, {"eval": EVAL_FILE}, result_file="eval")


# ---------------------------------------------------------------------------- demo


def _margin(text: str) -> tuple[str, float]:
    """``--margin METRIC=M`` (M > 0, in the metric's units): the pair (METRIC, M)."""
    metric, _, value = text.partition("=")
    try:
        margin = float(value)
    except ValueError:
        margin = float("nan")
    if not metric or not margin > 0 or margin == float("inf"):
        raise argparse.ArgumentTypeError(
            f"got {text!r}; expected METRIC=M with M a positive number, e.g. val_loss=0.01"
        )
    return metric, margin


def _add_margin_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--margin",
        dest="margins",
        type=_margin,
        action="append",
        metavar="METRIC=M",
        help="equivalence margin of a metric for the verdicts (repeatable; default 0.01 for "
        "val_loss/lm_loss in nats and for accuracies as fractions, none otherwise)",
    )


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    from moealign.studies.demo import DEFAULT_SEEDS, PRESETS

    parser.add_argument("--out", default="runs/demo", metavar="DIR", help="output directory")
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="quick", help="model and training size"
    )
    parser.add_argument(
        "--seeds",
        type=_int_at_least(0, 2**32 - 1),
        nargs="+",
        default=list(DEFAULT_SEEDS),
        metavar="SEED",
        help="train.seed of each run, at least 2",
    )
    _add_override_argument(parser, "override a config value of all three models")
    _add_margin_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _run_demo(args: argparse.Namespace) -> int | Document:
    from moealign.studies import demo

    status = demo.run(args)
    if status:
        return status
    files = {"summary": "summary.json", "markdown": "summary.md", "plot": "loss_curves.png"}
    return _written("demo", args.out, files, result_file="summary")


# ---------------------------------------------------------------------------- ablate


def _ablate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "study", metavar="STUDY.toml", help="study file (see moealign.studies.ablate)"
    )
    parser.add_argument(
        "--jobs", type=_int_at_least(1, 1024), default=1, metavar="N", help="cells run at once"
    )
    parser.add_argument("--out", metavar="DIR", help="study directory (default: from the study)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate every cell as `train` would and list the cells without running them",
    )


def _run_ablate(args: argparse.Namespace) -> int:
    from moealign.studies import ablate

    return ablate.run_ablate(args)


# ---------------------------------------------------------------------------- report, compare


def _report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="RUN_OR_STUDY_DIR")
    parser.add_argument(
        "--out", metavar="DIR", help="output directory (default: DIR/report for one input)"
    )
    parser.add_argument("--baseline", metavar="NAME", help="baseline variant (default: study's)")
    parser.add_argument(
        "--metrics", nargs="+", metavar="METRIC", help="table columns (default: main metrics)"
    )
    parser.add_argument(
        "--target-loss",
        type=float,
        metavar="LOSS",
        help="validation loss for time-to-target (default: the baseline's final)",
    )
    parser.add_argument("--title", default="moealign report", help="the report's title")
    _add_margin_argument(parser)


def _run_report(args: argparse.Namespace) -> Document:
    from moealign.studies import report

    files = report.run_report(args)
    return {
        "command": "report",
        "files": {
            "markdown": str(files.markdown),
            "html": str(files.html),
            "figures": [str(path) for path in files.figures],
            "model_cards": [str(path) for path in files.model_cards],
        },
        "result": {"inputs": list(args.paths), "title": args.title},
    }


def _compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_a", metavar="RUN_A")
    parser.add_argument("run_b", metavar="RUN_B")


def _run_compare(args: argparse.Namespace) -> Document:
    from moealign.studies import report

    result = report.comparison(args.run_a, args.run_b)
    print(report.compare_text(result))
    return {"command": "compare", "files": {}, "result": result}


# ---------------------------------------------------------------------------- analyze


def _analyze_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL_PATH_OR_NAME", help="transformers MoE model")
    parser.add_argument("--data", required=True, metavar="FILE", help="text file or .jsonl file")
    parser.add_argument("--text-field", default="text", help="JSONL field holding the text")
    parser.add_argument("--tokenizer", help="tokenizer path or name (default: the model's)")
    parser.add_argument("--out", default="analysis", metavar="DIR", help="output directory")
    parser.add_argument(
        "--seq-len", type=_int_at_least(1, MAX_SEQ_LEN), default=256, help="tokens per window"
    )
    parser.add_argument(
        "--batch-size", type=_int_at_least(1, MAX_BATCH), default=8, help="windows per forward pass"
    )
    parser.add_argument(
        "--max-tokens", type=_int_at_least(1), default=100_000, help="stop after this many"
    )


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _check_model_folder(name: str, field: str, needs_tokenizer: bool) -> None:
    from moealign.config import ConfigError
    from moealign.integrations.locations import pretrained_location

    path = Path(name).expanduser()
    if not path.exists():
        pretrained_location(name, field)  # refuses a missing local path
        return  # a Hugging Face model name: transformers resolves it
    if not path.is_dir():
        raise ConfigError(field, f"got {name!r}, a file; expected a model folder or a model name")
    if field == "model" and not (path / "config.json").is_file():
        raise ConfigError(field, f"got {name!r}, a folder without config.json")
    if needs_tokenizer and not any((path / file).is_file() for file in _TOKENIZER_FILES):
        raise ConfigError(
            field,
            f"got {name!r}, a folder without tokenizer files ({', '.join(_TOKENIZER_FILES)}); "
            "pass --tokenizer PATH",
        )


def _run_analyze(args: argparse.Namespace) -> Document:
    from moealign.config import ConfigError
    from moealign.training.preflight import check_writable_folder

    _check_model_folder(args.model, "model", needs_tokenizer=args.tokenizer is None)
    if args.tokenizer is not None:
        _check_model_folder(args.tokenizer, "--tokenizer", needs_tokenizer=True)
    if not Path(args.data).is_file():
        raise ConfigError("--data", f"got {args.data!r}, which is not a file")
    check_writable_folder(args.out, "--out")
    from moealign.integrations.analyze import (
        run_analyze,  # torch and transformers load only when analysing
    )

    try:
        run_analyze(args)
    except OSError as err:
        if Path(args.model).expanduser().exists():
            raise
        raise ConfigError(
            "model",
            f"got {args.model!r}: no such local folder, and no such model in the local Hugging "
            "Face cache",
        ) from err
    files = {
        "routing": "routing.json",
        "markdown": "routing.md",
        "utilisation_plot": "utilisation.png",
        "entropy_plot": "entropy_maxvio.png",
    }
    return _written("analyze", args.out, files, result_file="routing")


# ---------------------------------------------------------------------------- roma


def _roma_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--base", metavar="RUN_DIR", help="pretrained run")
    model.add_argument(
        "--hf-model", metavar="PATH", help="a transformers MoE model (directory or hub name)"
    )
    parser.add_argument(
        "--questions",
        metavar="FILE.jsonl",
        help="with --hf-model: one JSON question per line (question, options, answer, task)",
    )
    parser.add_argument(
        "--heldout-tasks",
        nargs="+",
        default=[],
        metavar="TASK",
        help="with --hf-model: the tasks held out of training (the held-out set)",
    )
    _add_config_arguments(parser)
    parser.add_argument("--out", metavar="DIR", required=True, help="results directory")


def _run_roma(args: argparse.Namespace) -> Document:
    from moealign.config import ConfigError

    if bool(args.hf_model) != bool(args.questions):
        raise ConfigError("--questions", "is given with --hf-model and only with it")
    if args.base and args.heldout_tasks:
        raise ConfigError("--heldout-tasks", "is given with --hf-model only (a run holds its own)")
    if args.hf_model:  # before torch loads (seconds), and never a missing path to the Hub
        _check_model_folder(args.hf_model, "--hf-model", needs_tokenizer=True)
        if not Path(args.questions).is_file():
            raise ConfigError("--questions", f"got {args.questions!r}, which is not a file")
    from moealign.roma.config import load_roma_config
    from moealign.training.preflight import check_device, check_writable_folder
    from moealign.training.runs import RunLock

    config = load_roma_config(args.config, args.overrides)
    check_device(config.device, "device")
    if args.base:
        _check_run_argument(args.base, "--base")
    check_writable_folder(args.out, "--out")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    base_lock = RunLock(args.base, shared=True) if args.base else contextlib.nullcontext()
    with base_lock, RunLock(args.out):
        from moealign.roma.study import RESULTS_FILE, TABLE_FILE, RomaStudy, markdown_tables

        if args.hf_model:
            study = RomaStudy.from_hf_model(
                args.hf_model, args.questions, args.heldout_tasks, config
            )
        else:
            study = RomaStudy.from_run(args.base, config)
        print(markdown_tables(study.run(args.out)))
    files = {"results": RESULTS_FILE, "markdown": TABLE_FILE}
    return _written("roma", args.out, files, result_file="results")


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory of `moealign train`")
    parser.add_argument("out", metavar="OUT", help="the Hugging Face model directory to write")
    parser.add_argument(
        "--step",
        type=_int_at_least(0),
        metavar="N",
        help="the checkpoint of step N (default: the newest)",
    )


def _run_export(args: argparse.Namespace) -> int:
    from moealign.integrations.hf_export import export_run

    try:
        out = export_run(args.run_dir, args.out, args.step)
    except ValueError as err:  # an existing OUT, a model Mixtral cannot express
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.run_dir} to {out}: AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


def _compress_arguments(parser: argparse.ArgumentParser) -> None:
    from moealign.config import COMPRESSION_METHODS

    parser.add_argument(
        "source", metavar="SOURCE", help="a moealign run directory or a Hugging Face model dir"
    )
    parser.add_argument("--method", required=True, help=" | ".join(COMPRESSION_METHODS))
    parser.add_argument(
        "--keep-experts", type=int, required=True, metavar="E'", help="experts per MoE layer"
    )
    parser.add_argument(
        "--calib",
        metavar="FILE",
        help="calibration text (.txt, or .jsonl with a 'text' field); default for a run: its "
        "own training data (required for a Hugging Face model)",
    )
    parser.add_argument(
        "--calib-tokens",
        type=int,
        default=8192,
        metavar="N",
        help="calibration tokens",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of Sub-MoE's K-means")
    parser.add_argument(
        "--rank",
        type=int,
        default=None,
        help="submoe only: joint-SVD rank (default: floor(d_out*d_in/(d_out+d_in)); a rank >= "
        "the matrices' own rank gives the frequency-weighted average of each cluster)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (new)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))


def _run_compress(args: argparse.Namespace) -> int | Document:
    from moealign.config import ConfigError

    if not Path(args.source).expanduser().is_dir():  # before torch loads (seconds)
        raise ConfigError(
            "SOURCE",
            f"got {args.source!r}, which is not a folder; expected a moealign run directory or a "
            "Hugging Face model directory",
        )
    from moealign.compression.command import run_compress  # torch loads only when compressing
    from moealign.compression.runs import REPORT_FILE

    status = run_compress(args)
    if status:
        return status
    return _written("compress", args.out, {"report": REPORT_FILE}, result_file="report")


COMMANDS: dict[str, Command] = {
    "train": Command(
        help="train a model from a config", add_arguments=_train_arguments, run=_run_train
    ),
    "eval": Command(
        help="evaluate a run directory (validation loss, routing, task accuracy)",
        add_arguments=_eval_arguments,
        run=_run_eval,
        json=True,
    ),
    "demo": Command(
        help="the main job: train and compare dense, softmax top-k MoE and MPI MoE models",
        add_arguments=_demo_arguments,
        run=_run_demo,
        json=True,
    ),
    "ablate": Command(
        help="run an ablation study: config variants × seeds, resumable",
        add_arguments=_ablate_arguments,
        run=_run_ablate,
    ),
    "report": Command(
        help="write a markdown/HTML report (tables, plots, model cards) from runs or studies",
        add_arguments=_report_arguments,
        run=_run_report,
        json=True,
    ),
    "compare": Command(
        help="print two runs side by side: config differences, final metrics, deltas",
        add_arguments=_compare_arguments,
        run=_run_compare,
        json=True,
    ),
    "analyze": Command(
        help="routing diagnostics of a Hugging Face MoE model on a text/JSONL file",
        add_arguments=_analyze_arguments,
        run=_run_analyze,
        json=True,
    ),
    "export": Command(
        help="export a run's checkpoint as a Hugging Face model directory (with its tokenizer)",
        add_arguments=_export_arguments,
        run=_run_export,
    ),
    "roma": Command(
        help="RoMA study: router tuning, RoMA, C3PO and oracle routing on a pretrained run or "
        "a transformers MoE model",
        add_arguments=_roma_arguments,
        run=_run_roma,
        json=True,
    ),
    "compress": Command(
        help="prune or merge the experts of a run or a Hugging Face MoE model (frequency, NAEE, "
        "M-SMoE, Sub-MoE) with a retention report",
        add_arguments=_compress_arguments,
        run=_run_compress,
        json=True,
    ),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help unless the help already names its default
    or there is none to show (None, a flag's False, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        default = action.default
        if "default" in (action.help or "") or default is None or default is False or default == []:
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="moealign",
        description="Train, adapt and analyse MoE routers.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error (for bug reports)"
    )
    parser.add_argument("--version", action="version", version=f"moealign {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(
            name, help=command.help, description=command.help, formatter_class=HelpFormatter
        )
        command.add_arguments(sub)
        sub.add_argument(
            "--verbose", action="store_true", help="show other libraries' INFO log messages too"
        )
        sub.add_argument(
            "--quiet", action="store_true", help="no progress on stderr (errors and notes stay)"
        )
        if command.json:
            sub.add_argument(
                "--json",
                action="store_true",
                help="print one JSON document on stdout (docs/json.md); the human output goes "
                "to stderr",
            )
        sub.set_defaults(run=command.run, json=False)
    return parser


def configure_logging(verbose: bool) -> None:
    """Log to stderr: moealign's own loggers from INFO, other libraries' (matplotlib,
    transformers, ...) from WARNING unless ``verbose``."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("moealign").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge-score's per-call INFO lines


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Errors that come from what the user gave (exit 2). ``ConfigError``, ``CheckpointError``,
    ``FileFormatError``, JSON and Unicode errors are ``ValueError``s; a safetensors error counts
    when safetensors was loaded."""
    types: list[type[BaseException]] = [ValueError, TypeError, OSError]
    safetensors = sys.modules.get("safetensors")
    if safetensors is not None and hasattr(safetensors, "SafetensorError"):
        types.append(safetensors.SafetensorError)
    return tuple(types)


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        text = f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    else:
        text = str(err)
    return " ".join(text.split()) or type(err).__name__


def _run(args: argparse.Namespace) -> int:
    """Run the command; with ``--json`` everything it prints goes to stderr and its document
    is the one thing on stdout (strict JSON: no NaN)."""
    if not args.json:
        result = args.run(args)
        return 0 if isinstance(result, dict) else result
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        result = args.run(args)
    if not isinstance(result, dict):
        return result  # stopped (a signal, an error status): no document
    stdout.write(json.dumps(result, indent=2, allow_nan=False) + "\n")
    stdout.flush()
    return 0


class Stopped(BaseException):
    """SIGTERM, raised where the process is (as SIGINT raises ``KeyboardInterrupt``), so that
    every command ends with one line and exit 143; ``train`` and ``ablate`` install their own
    handlers (save, then stop) while they work."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal = signal_name


@contextlib.contextmanager
def _stop_on_sigterm():
    """While a command runs in the main thread, SIGTERM raises :class:`Stopped`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        if _importing(frame):  # raised inside an import, it can abort a native extension
            retry = threading.Timer(0.1, os.kill, (os.getpid(), signum))
            retry.daemon = True
            retry.start()
            return
        raise Stopped(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _importing(frame) -> bool:
    """Whether the interrupted code is importing a module."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _out_of_memory(err: BaseException) -> bool:
    """A failed allocation (Python's, or torch's on the CPU or a GPU)."""
    if isinstance(err, MemoryError):
        return True
    text = str(err)
    return type(err).__name__ == "OutOfMemoryError" or (
        isinstance(err, RuntimeError)
        and ("can't allocate memory" in text or "out of memory" in text.lower())
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``moealign``; returns the process exit status (also for ``--help`` and
    argument errors, which argparse ends with ``SystemExit``)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 2
    configure_logging(args.verbose)
    from moealign import progress

    progress.set_quiet(args.quiet)
    for stream in (sys.stdout, sys.stderr):  # a path that is not UTF-8 prints, escaped
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        with _stop_on_sigterm():
            if "MOEALIGN_PARENT_PID" in os.environ:  # a cell of `moealign ablate`
                from moealign.studies.ablate import stop_with_parent

                stop_with_parent()
            return _run(args)
    except (KeyboardInterrupt, Stopped) as stop:
        name = stop.signal if isinstance(stop, Stopped) else "SIGINT"
        print(
            f"error: interrupted by {name}; what was already written is complete (rerun the "
            "command to finish)",
            file=sys.stderr,
        )
        return SIGNAL_EXIT[name]
    except Exception as err:
        if args.debug:
            traceback.print_exc()
        if _out_of_memory(err):
            print(
                f"error: out of memory ({_one_line(err)[:200]}); make the model, batch, "
                "sequence or evaluation smaller",
                file=sys.stderr,
            )
            return 2
        if isinstance(err, _user_error_types()):
            print(f"error: {_one_line(err)}", file=sys.stderr)
            return 2
        print(
            f"error: internal error ({type(err).__name__}: {_one_line(err)}); "
            "rerun with --debug for the traceback and report it",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
