"""The ``moealign`` command line.

Each subcommand is a pair of small functions — one adds its arguments, one runs it and returns
the exit status — registered in :data:`COMMANDS`. Arguments are declared here without importing
torch or matplotlib (``moealign --help`` and every ``moealign COMMAND --help`` stay fast); a
command imports what it needs when it runs.

Exit status: 0 done; 2 a problem with what the user asked for (config, arguments, files, a run
folder, a checkpoint, a full disk: any ``ValueError``, ``TypeError``, ``OSError`` or
safetensors error), printed as one line ``error: <message>`` on stderr; 1 an internal failure,
also one line; 130/143 a ``train`` or ``ablate`` stopped by SIGINT/SIGTERM after saving its
state. Tracebacks only with ``moealign --debug COMMAND ...``. Log messages below WARNING are
shown only for moealign's own loggers, unless ``--verbose``; every ``--help`` shows the options'
defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from moealign import __version__

__all__ = ["COMMANDS", "Command", "HelpFormatter", "build_parser", "configure_logging", "main"]

SIGNAL_EXIT = {"SIGINT": 130, "SIGTERM": 143}  # 128 + the signal number, as a shell reports it


@dataclass(frozen=True)
class Command:
    """A subcommand: ``add_arguments(parser)`` declares its options, ``run(args)`` returns the
    exit status."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: <prog>: <message>`` and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"got {text!r}; expected an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"got {value}; expected an integer >= {minimum}")
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
    from moealign.config import load_config
    from moealign.training.preflight import check_before_training
    from moealign.training.runs import CONFIG_FILE, RunDirectory, RunLock, finished_step

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
        type=_int_at_least(0),
        default=None,
        metavar="N",
        help="examples per task and evaluation set (default: the run's train.task_eval_examples)",
    )
    parser.add_argument(
        "--eval-batches",
        type=_int_at_least(1),
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


def _run_eval(args: argparse.Namespace) -> int:
    from moealign.training.preflight import check_device
    from moealign.training.runs import RunLock

    check_device(args.device, "--device")
    _check_run_argument(args.run_dir, "RUN_DIR")
    with RunLock(args.run_dir):
        from moealign.evaluation.run import EVAL_FILE, evaluate_run, summary_rows

        result = evaluate_run(args.run_dir, args.task_examples, args.eval_batches, args.device)
    print(_format_table(summary_rows(result)))
    print(f"written to {Path(args.run_dir) / EVAL_FILE}")
    return 0


# ---------------------------------------------------------------------------- demo


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    from moealign.studies.demo import DEFAULT_SEEDS, PRESETS

    parser.add_argument("--out", default="runs/demo", metavar="DIR", help="output directory")
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="quick", help="model and training size"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=list(DEFAULT_SEEDS),
        metavar="SEED",
        help="train.seed of each run, at least 2",
    )
    _add_override_argument(parser, "override a config value of all three models")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _run_demo(args: argparse.Namespace) -> int:
    from moealign.studies import demo

    return demo.run(args)


# ---------------------------------------------------------------------------- ablate


def _ablate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "study", metavar="STUDY.toml", help="study file (see moealign.studies.ablate)"
    )
    parser.add_argument(
        "--jobs", type=_int_at_least(1), default=1, metavar="N", help="cells run at once"
    )
    parser.add_argument("--out", metavar="DIR", help="study directory (default: from the study)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate every cell as `train` would and list the cells without running them",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no line per cell as it starts and ends"
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


def _run_report(args: argparse.Namespace) -> int:
    from moealign.studies import report

    return report.run_report(args)


def _compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_a", metavar="RUN_A")
    parser.add_argument("run_b", metavar="RUN_B")


def _run_compare(args: argparse.Namespace) -> int:
    from moealign.studies import report

    return report.run_compare(args)


# ---------------------------------------------------------------------------- analyze


def _analyze_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL_PATH_OR_NAME", help="transformers MoE model")
    parser.add_argument("--data", required=True, metavar="FILE", help="text file or .jsonl file")
    parser.add_argument("--text-field", default="text", help="JSONL field holding the text")
    parser.add_argument("--tokenizer", help="tokenizer path or name (default: the model's)")
    parser.add_argument("--out", default="analysis", metavar="DIR", help="output directory")
    parser.add_argument("--seq-len", type=_int_at_least(1), default=256, help="tokens per window")
    parser.add_argument(
        "--batch-size", type=_int_at_least(1), default=8, help="windows per forward pass"
    )
    parser.add_argument(
        "--max-tokens", type=_int_at_least(1), default=100_000, help="stop after this many"
    )


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _looks_like_path(name: str) -> bool:
    """A name that can only mean a local folder (a hub id is ``name`` or ``org/name``)."""
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or name.endswith("/")
        or "\\" in name
    )


def _check_model_folder(name: str, field: str, needs_tokenizer: bool) -> None:
    from moealign.config import ConfigError

    path = Path(name).expanduser()
    if not path.exists():
        if _looks_like_path(name):
            raise ConfigError(field, f"got {name!r}, a folder that does not exist")
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


def _run_analyze(args: argparse.Namespace) -> int:
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
        return run_analyze(args)
    except OSError as err:
        if Path(args.model).expanduser().exists():
            raise
        raise ConfigError(
            "model",
            f"got {args.model!r}: no such local folder, and no such model in the local Hugging "
            "Face cache",
        ) from err


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


def _run_roma(args: argparse.Namespace) -> int:
    from moealign.config import ConfigError
    from moealign.roma.config import load_roma_config
    from moealign.training.preflight import check_device, check_writable_folder
    from moealign.training.runs import RunLock

    if bool(args.hf_model) != bool(args.questions):
        raise ConfigError("--questions", "is given with --hf-model and only with it")
    if args.base and args.heldout_tasks:
        raise ConfigError("--heldout-tasks", "is given with --hf-model only (a run holds its own)")
    config = load_roma_config(args.config, args.overrides)
    check_device(config.device, "device")
    if args.base:
        _check_run_argument(args.base, "--base")
    else:
        _check_model_folder(args.hf_model, "--hf-model", needs_tokenizer=True)
        if not Path(args.questions).is_file():
            raise ConfigError("--questions", f"got {args.questions!r}, which is not a file")
    check_writable_folder(args.out, "--out")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    base_lock = RunLock(args.base, shared=True) if args.base else contextlib.nullcontext()
    with base_lock, RunLock(args.out):
        from moealign.roma.study import RomaStudy, markdown_tables

        if args.hf_model:
            study = RomaStudy.from_hf_model(
                args.hf_model, args.questions, args.heldout_tasks, config
            )
        else:
            study = RomaStudy.from_run(args.base, config)
        print(markdown_tables(study.run(args.out)))
    return 0


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory of `moealign train`")
    parser.add_argument("out", metavar="OUT", help="the Hugging Face model directory to write")
    parser.add_argument(
        "--step", type=int, metavar="N", help="the checkpoint of step N (default: the newest)"
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


def _run_compress(args: argparse.Namespace) -> int:
    from moealign.compression.command import run_compress  # torch loads only when compressing

    return run_compress(args)


COMMANDS: dict[str, Command] = {
    "train": Command(
        help="train a model from a config", add_arguments=_train_arguments, run=_run_train
    ),
    "eval": Command(
        help="evaluate a run directory (validation loss, routing, task accuracy)",
        add_arguments=_eval_arguments,
        run=_run_eval,
    ),
    "demo": Command(
        help="the main job: train and compare dense, softmax top-k MoE and MPI MoE models",
        add_arguments=_demo_arguments,
        run=_run_demo,
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
    ),
    "compare": Command(
        help="print two runs side by side: config differences, final metrics, deltas",
        add_arguments=_compare_arguments,
        run=_run_compare,
    ),
    "analyze": Command(
        help="routing diagnostics of a Hugging Face MoE model on a text/JSONL file",
        add_arguments=_analyze_arguments,
        run=_run_analyze,
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
    ),
    "compress": Command(
        help="prune or merge the experts of a run or a Hugging Face MoE model (frequency, NAEE, "
        "M-SMoE, Sub-MoE) with a retention report",
        add_arguments=_compress_arguments,
        run=_run_compress,
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
        sub.set_defaults(run=command.run)
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``moealign``; returns the process exit status (also for ``--help`` and
    argument errors, which argparse ends with ``SystemExit``)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 2
    configure_logging(args.verbose)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return SIGNAL_EXIT["SIGINT"]
    except Exception as err:
        if args.debug:
            traceback.print_exc()
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
