"""Bad inputs, part 3 (issue 23): writes that must not reach what a command does not own,
records of the wrong type, unbounded sizes, files that are not regular, messages that must name
the file or field, and input that used to be accepted silently. Each gives one ``error:`` line
naming the field or file, exit 2, no traceback, and leaves every file that existed unchanged
(helpers_bad_inputs). Cases that need a run work on a copy of one trained tiny run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers_bad_inputs import Case, check_case, params, train_args, train_tiny_run, write
from helpers_cli import CONFIGS


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished tiny run with checkpoints at steps 1 and 2."""
    return train_tiny_run(tmp_path_factory.mktemp("trained"))


# ------------------------------------------------------------------------------- plant helpers


def _checkpoints(tmp: Path) -> list[Path]:
    return sorted((tmp / "run" / "checkpoints").glob("step_*"))


def _lock_links_to_a_file(tmp: Path) -> None:
    (tmp / "victim.txt").write_text("someone else's file\n")
    lock = tmp / "run" / ".lock"
    lock.unlink(missing_ok=True)
    lock.symlink_to(tmp / "victim.txt")


def _checkpoints_link_to_another_run(tmp: Path) -> None:
    other = tmp / "other"
    shutil.copytree(tmp / "run", other)
    shutil.rmtree(tmp / "run" / "checkpoints")
    (tmp / "run" / "checkpoints").symlink_to(other / "checkpoints")


def _checkpoint_links_to_another_run(tmp: Path) -> None:
    """The newest checkpoint a link into another run: rotation would delete that run's."""
    other = tmp / "other"
    shutil.copytree(tmp / "run", other)
    newest = _checkpoints(tmp)[-1]
    shutil.rmtree(newest)
    newest.symlink_to(other / "checkpoints" / newest.name)


def _edit_states(edit):
    def setup(tmp: Path) -> None:
        for checkpoint in _checkpoints(tmp):
            path = checkpoint / "state.json"
            path.write_text(json.dumps(edit(json.loads(path.read_text()))))

    return setup


def _foreign_identity(state: dict) -> dict:
    """A checkpoint written by another run: its identity (a hash of config and seed) differs."""
    state["trainer"]["identity"] = "0" * 64
    return state


def _nan_weights(tmp: Path) -> None:
    """Every checkpoint's weights NaN, with their SHA-256 recorded (so only the values tell)."""
    for checkpoint in _checkpoints(tmp):
        path = checkpoint / "model.safetensors"
        tensors = {k: torch.full_like(v, float("nan")) for k, v in load_file(str(path)).items()}
        save_file(tensors, str(path))
        state = json.loads((checkpoint / "state.json").read_text())
        state["files"]["model.safetensors"] = hashlib.sha256(path.read_bytes()).hexdigest()
        (checkpoint / "state.json").write_text(json.dumps(state))


def _metrics_line(index: int, line: str):
    """Replace line ``index`` of the run's metrics.jsonl (not its last: a torn tail is
    tolerated by design)."""

    def setup(tmp: Path) -> None:
        path = tmp / "run" / "metrics.jsonl"
        lines = path.read_text().splitlines()
        lines[index] = line
        path.write_text("\n".join(lines) + "\n")

    return setup


def _edit_json(name: str, edit):
    def setup(tmp: Path) -> None:
        path = tmp / "run" / name
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))

    return setup


def _lookalike_run(tmp: Path) -> None:
    """A folder with the file names of a run that moealign did not write."""
    folder = tmp / "lookalike"
    folder.mkdir()
    (folder / "meta.json").write_text('{"author": "me"}')
    (folder / "metrics.jsonl").write_text('{"step": 1}\n')
    (folder / "config.json").write_text("{}")
    (folder / "thesis.tex").write_text("months of work\n")


def _other_study(tmp: Path) -> None:
    (tmp / "base.toml").write_text((CONFIGS / "tiny.toml").read_text())
    (tmp / "study.toml").write_text(f'base = "base.toml"\nout_dir = "{tmp}/shared"\n')
    (tmp / "shared").mkdir()
    (tmp / "shared" / "study.json").write_text(
        json.dumps({"name": "another", "study_file": "another.toml", "cells": []})
    )


def _study(body: str):
    def setup(tmp: Path) -> None:
        (tmp / "base.toml").write_text((CONFIGS / "tiny.toml").read_text())
        (tmp / "study.toml").write_text(f'base = "base.toml"\n{body}\n')

    return setup


def _fifo(tmp: Path) -> None:
    os.mkfifo(tmp / "config.toml")


def _huge_config(tmp: Path) -> None:
    with open(tmp / "big.toml", "wb") as handle:  # sparse: 300 MiB that take no disk
        handle.truncate(300 * 2**20)


def _compress(*extra: str, method: str = "frequency") -> list[str]:
    return ["compress", "{run}", "--method", method, "--keep-experts", "2", *extra]


def _hf_folder(config: dict):
    return write("hf/config.json", json.dumps(config))


RESUME = [*train_args("train.steps=3"), "--out", "{run}", "--resume"]
EVAL = ["eval", "{run}", "--device", "cpu"]
DEEP = "[" * 80 + "1" + "]" * 80

CASES = [
    # ---- 1. writes that reach what the command does not own
    Case(
        "export-into-own-checkpoints",
        ["export", "{run}", "{run}/checkpoints/step_999999"],
        ("OUT", "inside the run folder"),
        needs_run=True,
    ),
    Case(
        "export-into-the-run",
        ["export", "{run}", "{run}/hf"],
        ("OUT", "inside the run folder"),
        needs_run=True,
    ),
    Case(
        "export-into-a-run-through-a-link",
        ["export", "{run}", "{tmp}/link/hf"],
        ("OUT", "inside the run folder"),
        needs_run=True,
        setup=lambda tmp: (tmp / "link").symlink_to(tmp / "run" / "checkpoints"),
    ),
    Case(
        "compress-out-inside-source",
        _compress("--out", "{run}/checkpoints/small"),
        ("--out", "inside the run folder"),
        needs_run=True,
    ),
    Case(
        "compress-out-is-a-run",
        _compress("--out", "{run}"),
        ("--out", "holds a moealign run"),
        needs_run=True,
    ),
    Case(
        "report-out-holds-other-files",
        ["report", "{run}", "--out", "{tmp}/mine"],
        ("--out", "did not write", "notes.txt"),
        needs_run=True,
        setup=write("mine/notes.txt", "my notes\n"),
    ),
    Case(
        "report-out-in-checkpoints",
        ["report", "{run}", "--out", "{run}/checkpoints"],
        ("--out", "inside the run folder"),
        needs_run=True,
    ),
    Case(
        "report-out-is-a-run",
        ["report", "{run}", "--out", "{run}"],
        ("--out", "holds a moealign run"),
        needs_run=True,
    ),
    Case(
        "overwrite-a-lookalike-of-a-run",
        [*train_args(), "--out", "{tmp}/lookalike", "--overwrite"],
        ("lookalike", "holds no moealign run"),
        setup=_lookalike_run,
    ),
    Case(
        "train-out-inside-a-run",
        [*train_args(), "--out", "{run}/checkpoints/step_000009"],
        ("--out", "inside the run folder"),
        needs_run=True,
    ),
    Case(
        "eval-lock-is-a-link",
        EVAL,
        (".lock", "symbolic link"),
        needs_run=True,
        setup=_lock_links_to_a_file,
    ),
    Case(
        "resume-lock-is-a-link",
        RESUME,
        (".lock", "symbolic link"),
        needs_run=True,
        setup=_lock_links_to_a_file,
    ),
    Case(
        "resume-checkpoints-link-to-another-run",
        RESUME,
        ("checkpoints", "symbolic link"),
        needs_run=True,
        setup=_checkpoints_link_to_another_run,
    ),
    Case(
        "resume-metrics-a-link",
        RESUME,
        ("metrics.jsonl", "symbolic link"),
        needs_run=True,
        setup=lambda tmp: (
            (tmp / "elsewhere.jsonl").write_text('{"step": 1}\n'),
            (tmp / "run" / "metrics.jsonl").unlink(),
            (tmp / "run" / "metrics.jsonl").symlink_to(tmp / "elsewhere.jsonl"),
        ),
    ),
    Case(
        "resume-a-checkpoint-is-a-link",
        RESUME,
        ("step_000002", "symbolic link"),
        needs_run=True,
        setup=_checkpoint_links_to_another_run,
    ),
    Case(
        "eval-json-a-link",
        EVAL,
        ("eval.json", "symbolic link"),
        needs_run=True,
        setup=lambda tmp: (
            (tmp / "mine.json").write_text("{}"),
            (tmp / "run" / "eval.json").symlink_to(tmp / "mine.json"),
        ),
    ),
    Case(
        "ablate-into-another-study",
        ["ablate", "{tmp}/study.toml", "--dry-run"],
        ("out_dir", "another"),
        setup=_other_study,
    ),
    Case(
        "ablate-into-a-run",
        ["ablate", "{tmp}/study.toml", "--out", "{run}", "--dry-run"],
        ("out_dir", "holds a moealign run"),
        needs_run=True,
        setup=_study(""),
    ),
    Case(
        "ablate-into-a-folder-of-files",
        ["ablate", "{tmp}/study.toml", "--out", "{tmp}/papers"],
        ("out_dir", "not empty"),
        setup=lambda tmp: (_study("")(tmp), write("papers/draft.md", "text")(tmp)),
    ),
    # ---- a refused resume changes nothing (config.json and meta.json included)
    Case(
        "resume-garbage-mid-metrics",
        RESUME,
        ("metrics.jsonl:2", "not valid JSON"),
        needs_run=True,
        setup=_metrics_line(1, "{garbage"),
    ),
    Case(
        "resume-metrics-step-a-string",
        RESUME,
        ("metrics.jsonl:1", "step 'one'"),
        needs_run=True,
        setup=_metrics_line(0, '{"step": "one", "split": "val"}'),
    ),
    Case(
        "resume-meta-a-list",
        RESUME,
        ("meta.json", "a JSON list", "expected an object"),
        needs_run=True,
        setup=write("run/meta.json", '["seed", 0]'),
    ),
    Case(
        "resume-final-eval-a-number",
        RESUME,
        ("final_eval.json", "expected an object"),
        needs_run=True,
        setup=write("run/final_eval.json", "3.5"),
    ),
    Case(
        "resume-final-eval-step-a-list",
        RESUME,
        ("final_eval.json", "step [2]"),
        needs_run=True,
        setup=_edit_json("final_eval.json", lambda d: {**d, "step": [2]}),
    ),
    Case(
        "resume-meta-resumed-a-string",
        RESUME,
        ("meta.json", "resumed"),
        needs_run=True,
        setup=_edit_json("meta.json", lambda d: {**d, "resumed": "yes"}),
    ),
    Case(
        "resume-folder-missing",
        ["train", "--resume", "--out", "{tmp}/never-trained"],
        ("cannot resume", "never-trained", "no such folder"),
    ),
    Case(
        "resume-folder-holds-no-run",
        ["train", "--resume", "--out", "{tmp}/empty"],
        ("cannot resume", "empty", "holds no moealign run"),
        setup=lambda tmp: (tmp / "empty").mkdir(),
    ),
    # ---- 3. upper bounds, files that are not regular, nesting
    Case(
        "examples-per-task-1e9",
        train_args("data.examples_per_task=1000000000"),
        ("data.examples_per_task", "<="),
    ),
    Case(
        "eval-batches-1e9",
        train_args("train.eval_batches=1000000000"),
        ("train.eval_batches", "<="),
    ),
    Case("lr-1e300", train_args("optim.lr=1e300"), ("optim.lr", "<= 10000")),
    Case("matrix-lr-huge", train_args("optim.matrix_lr=1e9"), ("optim.matrix_lr", "<= 10000")),
    Case(
        "d-model-1e20",
        train_args("model.d_model=100000000000000000000"),
        ("model.d_model", "<="),
    ),
    Case("batch-size-huge", train_args("train.batch_size=10000000"), ("train.batch_size",)),
    Case("steps-1e12", train_args("train.steps=1000000000000"), ("train.steps",)),
    Case("seq-len-huge", train_args("train.seq_len=100000000"), ("train.seq_len",)),
    Case(
        "balance-coef-huge",
        train_args("loss.balance_coef=1e30"),
        ("loss.balance_coef",),
    ),
    Case("config-dev-zero", ["train", "--config", "/dev/zero"], ("/dev/zero", "not a regular")),
    Case(
        "config-a-fifo",
        ["train", "--config", "{tmp}/config.toml"],
        ("config.toml", "not a regular"),
        setup=_fifo,
    ),
    Case(
        "config-300-mib",
        ["train", "--config", "{tmp}/big.toml"],
        ("big.toml", "larger than"),
        setup=_huge_config,
    ),
    Case(
        "config-nested-deeply",
        ["train", "--config", "{tmp}/deep.toml"],
        ("deep.toml", "nested more than 64"),
        setup=write("deep.toml", f"[model.router_options]\nx = {DEEP}\n"),
    ),
    Case(
        "set-nested-deeply",
        train_args(f"model.router_options.x={DEEP}"),
        ("model.router_options.x", "nested more than 64"),
    ),
    Case(
        "study-file-a-fifo",
        ["ablate", "{tmp}/config.toml"],
        ("study file", "not a regular"),
        setup=_fifo,
    ),
    Case(
        "compress-calib-tokens-1e12",
        _compress("--calib-tokens", "1000000000000", "--out", "{tmp}/c"),
        ("--calib-tokens",),
        needs_run=True,
    ),
    Case(
        "eval-batches-argument-huge",
        [*EVAL, "--eval-batches", "1000000000"],
        ("--eval-batches", "10,000"),
        needs_run=True,
    ),
    Case(
        "analyze-seq-len-huge",
        ["analyze", "m", "--data", "x", "--seq-len", "100000000000"],
        ("--seq-len",),
    ),
    Case(
        "roma-k-1e6", ["roma", "--base", "{run}", "--out", "{tmp}/o", "--set", "k=1000000"], ("k",)
    ),
    # ---- 4. records of the wrong type: one clear line, not an internal error
    Case(
        "report-metrics-record-without-step",
        ["report", "{run}", "--out", "{tmp}/rep"],
        ("metrics.jsonl:1", "step None"),
        needs_run=True,
        setup=_metrics_line(0, '{"split": "val", "val_loss": 1.0}'),
    ),
    Case(
        "report-metrics-list-for-a-number",
        ["report", "{run}", "--out", "{tmp}/rep"],
        ("metrics.jsonl:1", "val_loss", "expected a number"),
        needs_run=True,
        setup=_metrics_line(0, '{"step": 0, "split": "val", "val_loss": [1, 2]}'),
    ),
    Case(
        "report-meta-seed-a-string",
        ["report", "{run}", "--out", "{tmp}/rep"],
        ("meta.json", "seed 'zero'"),
        needs_run=True,
        setup=_edit_json("meta.json", lambda d: {**d, "seed": "zero"}),
    ),
    Case(
        "report-final-eval-object-for-a-number",
        ["report", "{run}", "--out", "{tmp}/rep"],
        ("final_eval.json", "val_loss", "expected a number"),
        needs_run=True,
        setup=_edit_json("final_eval.json", lambda d: {**d, "val_loss": {"v": 1}}),
    ),
    Case(
        "export-config-edited-to-another-shape",
        ["export", "{run}", "{tmp}/hf"],
        ("checkpoint", "cannot be loaded"),
        needs_run=True,
        setup=_edit_json(
            "config.json", lambda d: {**d, "model": {**d["model"], "expert_d_ff": 48}}
        ),
    ),
    Case(
        "export-step-of-config-edited",
        ["export", "{run}", "{tmp}/hf", "--step", "2"],
        ("checkpoint", "does not fit", "config.json"),
        needs_run=True,
        setup=_edit_json(
            "config.json", lambda d: {**d, "model": {**d["model"], "expert_d_ff": 48}}
        ),
    ),
    Case(
        "compress-hf-config-transformers-rejects",
        [
            "compress",
            "{tmp}/hf",
            "--method",
            "frequency",
            "--keep-experts",
            "2",
            "--calib",
            "{tmp}/c.txt",
            "--out",
            "{tmp}/out",
        ],
        ("SOURCE", "hf", "cannot be loaded"),
        setup=lambda tmp: (
            _hf_folder({"model_type": "mixtral", "num_local_experts": "four"})(tmp),
            write("c.txt", "text\n")(tmp),
        ),
    ),
    # ---- 5. messages that name the problem
    Case("compress-seed-negative", _compress("--seed", "-1", "--out", "{tmp}/c"), ("--seed",)),
    Case(
        "compress-seed-beyond-numpy",
        _compress("--seed", str(2**40), "--out", "{tmp}/c"),
        ("--seed", "4294967295"),
    ),
    Case("train-seed-2-pow-40", train_args(f"train.seed={2**40}"), ("train.seed", "4294967296")),
    Case("data-seed-2-pow-63", train_args(f"data.seed={2**63}"), ("data.seed",)),
    Case(
        "export-step-beyond-int64",
        ["export", "{run}", "{tmp}/hf", "--step", str(10**30)],
        ("--step",),
        needs_run=True,
    ),
    Case(
        "export-out-dangling-link",
        ["export", "{run}", "{tmp}/dangling"],
        ("OUT", "dangling", "does not exist"),
        needs_run=True,
        setup=lambda tmp: (tmp / "dangling").symlink_to(tmp / "nowhere"),
    ),
    Case(
        "export-corrupt-tokenizer",
        ["export", "{run}", "{tmp}/hf"],
        ("tokenizer", "cannot be loaded"),
        needs_run=True,
        setup=write("run/tokenizer/tokenizer.json", '{"truncated": '),
    ),
    # ---- 6. no longer accepted silently
    Case(
        "resume-checkpoints-of-another-run",
        RESUME,
        ("belongs to another run",),
        needs_run=True,
        setup=_edit_states(_foreign_identity),
    ),
    Case(
        "eval-nan-weights",
        EVAL,
        ("non-finite weights",),
        needs_run=True,
        setup=_nan_weights,
    ),
    Case("run-name-next-line", train_args('name="a\u0085b"'), ("name", "control character")),
    Case(
        "run-name-not-utf8",
        train_args("name=" + os.fsdecode(b"run-\xff")),
        ("name", "not UTF-8"),
    ),
    Case(
        "compression-section-in-set",
        train_args("compression.method=frequency"),
        ("compression.method", "moealign compress"),
    ),
    Case(
        "compression-section-in-file",
        ["train", "--config", "{tmp}/c.toml"],
        ("compression", "moealign compress"),
        setup=write("c.toml", '[compression]\nmethod = "naee"\n'),
    ),
    Case(
        "moe-with-no-moe-layer",
        train_args("model.moe_every=3"),
        ("model.moe_every", "no layer would be MoE"),
    ),
    Case(
        "ablate-out-dir-empty",
        ["ablate", "{tmp}/study.toml", "--dry-run"],
        ("out_dir", "not empty"),
        setup=_study('out_dir = ""'),
    ),
    Case(
        "ablate-out-argument-empty",
        ["ablate", "{tmp}/study.toml", "--out", "", "--dry-run"],
        ("out_dir",),
        setup=_study(""),
    ),
    Case(
        "roma-negative-seed",
        ["roma", "--base", "{run}", "--out", "{tmp}/o", "--set", "seeds=[-1]"],
        ("seeds", ">= 0"),
    ),
    Case(
        "roma-core-experts-beyond-e",
        ["roma", "--base", "{run}", "--out", "{tmp}/o", "--set", "c3po_core_experts=99"],
        ("c3po_core_experts", "4 experts"),
        needs_run=True,
    ),
    Case(
        "compress-rank-1e9",
        _compress("--rank", "1000000000", "--out", "{tmp}/c", method="submoe"),
        ("--rank",),
        needs_run=True,
    ),
    Case(
        "compress-rank-beyond-the-model",
        _compress("--rank", "5000", "--out", "{tmp}/c", method="submoe"),
        ("--rank", "at most"),
        needs_run=True,
    ),
    Case(
        "report-target-loss-nan",
        ["report", "{run}", "--target-loss", "nan", "--out", "{tmp}/rep"],
        ("--target-loss", "finite"),
        needs_run=True,
    ),
    Case(
        "report-target-loss-negative",
        ["report", "{run}", "--target-loss", "-1", "--out", "{tmp}/rep"],
        ("--target-loss",),
        needs_run=True,
    ),
]


@pytest.mark.parametrize("case", params(CASES))
def test_bad_input_is_one_clear_error(case, tmp_path, capsys, monkeypatch, trained_run):
    monkeypatch.chdir(tmp_path)
    check_case(case, tmp_path, capsys, trained_run)
