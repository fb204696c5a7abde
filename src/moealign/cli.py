"""The ``moealign`` command line.

Each subcommand is a pair of small functions — one adds its arguments, one runs it and returns
the exit status — registered in :data:`COMMANDS`. Errors in what the user asked for (config,
run directory, checkpoint) print one line ``error: <message>`` to stderr and exit with status 2;
no traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from moealign.config import ConfigError, load_config
from moealign.studies import ablate, report
from moealign.training.checkpoint import CheckpointError
from moealign.training.runs import CONFIG_FILE, RunExistsError

__all__ = ["COMMANDS", "Command", "build_parser", "main"]

USAGE_ERRORS = (ConfigError, RunExistsError, CheckpointError, report.RunDataError)


@dataclass(frozen=True)
class Command:
    """A subcommand: ``add_arguments(parser)`` declares its options, ``run(args)`` returns the
    exit status."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


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


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    _add_config_arguments(parser)
    parser.add_argument("--out", metavar="DIR", help="run directory (default: out_dir/name)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--resume",
        action="store_true",
        help="continue from the last checkpoint (without --config: the run's recorded config)",
    )
    mode.add_argument("--overwrite", action="store_true", help="replace an existing run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _format_table(rows: Sequence[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _run_train(args: argparse.Namespace) -> int:
    from moealign.training.trainer import Trainer  # torch and the model load only when training

    config_path = args.config
    recorded = Path(args.out or "") / CONFIG_FILE
    if config_path is None and args.resume and args.out and recorded.is_file():
        config_path = recorded  # resume a run directory from its own record
    config = load_config(config_path, args.overrides)
    trainer = Trainer(
        config,
        run_dir=args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    try:
        result = trainer.train()
    finally:
        trainer.close()
    if not trainer.dist.is_main:
        return 0
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
    return 0


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory of `moealign train`")
    parser.add_argument(
        "--task-examples",
        type=int,
        default=None,
        metavar="N",
        help="examples per task and evaluation set (default: the run's train.task_eval_examples)",
    )
    parser.add_argument(
        "--eval-batches",
        type=int,
        default=None,
        metavar="N",
        help="validation batches (default: the run's train.eval_batches)",
    )
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))


def _run_eval(args: argparse.Namespace) -> int:
    from moealign.evaluation.run import EVAL_FILE, evaluate_run, summary_rows

    result = evaluate_run(args.run_dir, args.task_examples, args.eval_batches, args.device)
    print(_format_table(summary_rows(result)))
    print(f"written to {Path(args.run_dir) / EVAL_FILE}")
    return 0


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    from moealign.studies.demo import PRESETS

    parser.add_argument("--out", default="runs/demo", metavar="DIR", help="output directory")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    _add_override_argument(parser, "override a config value of all three models")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _run_demo(args: argparse.Namespace) -> int:
    from moealign.studies import demo

    return demo.run(args)


def _analyze_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL_PATH_OR_NAME", help="transformers MoE model")
    parser.add_argument("--data", required=True, metavar="FILE", help="text file or .jsonl file")
    parser.add_argument("--text-field", default="text", help="JSONL field holding the text")
    parser.add_argument("--tokenizer", help="tokenizer path or name (default: the model's)")
    parser.add_argument("--out", default="analysis", metavar="DIR", help="output directory")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--max-tokens", type=int, default=100_000, help="stop after this many")


def _run_analyze(args: argparse.Namespace) -> int:
    from moealign.integrations.analyze import (
        run_analyze,  # torch and transformers load only when analysing
    )

    try:
        return run_analyze(args)
    except ValueError as err:  # bad data, options or an unsupported model
        print(f"error: {err}", file=sys.stderr)
        return 2


def _roma_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", metavar="RUN_DIR", required=True, help="pretrained run")
    _add_config_arguments(parser)
    parser.add_argument("--out", metavar="DIR", required=True, help="results directory")


def _run_roma(args: argparse.Namespace) -> int:
    from moealign.roma.config import load_roma_config
    from moealign.roma.study import RomaStudy, markdown_tables

    study = RomaStudy(args.base, load_roma_config(args.config, args.overrides))
    print(markdown_tables(study.run(args.out)))
    return 0


def _compress_arguments(parser: argparse.ArgumentParser) -> None:
    from moealign.compression.command import add_compress_arguments

    add_compress_arguments(parser)


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
        help=ablate.ABLATE_HELP,
        add_arguments=ablate.add_ablate_arguments,
        run=ablate.run_ablate,
    ),
    "report": Command(
        help=report.REPORT_HELP, add_arguments=report.add_report_arguments, run=report.run_report
    ),
    "compare": Command(
        help=report.COMPARE_HELP,
        add_arguments=report.add_compare_arguments,
        run=report.run_compare,
    ),
    "analyze": Command(
        help="routing diagnostics of a Hugging Face MoE model on a text/JSONL file",
        add_arguments=_analyze_arguments,
        run=_run_analyze,
    ),
    "roma": Command(
        help="RoMA study: router tuning, RoMA, C3PO and oracle routing on a pretrained run",
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


class _Parser(argparse.ArgumentParser):
    """Bad command-line arguments are one ``error:`` line (and exit status 2), like every other
    usage error; ``--help`` shows the usage."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moealign", description="Train, adapt and analyse MoE routers.")
    subparsers = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``moealign``; returns the process exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge-score's per-call INFO lines
    try:
        return args.run(args)
    except USAGE_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
