"""Bad inputs, part 2: run folders, checkpoints, data files, study files and the arguments of
``eval``, ``report``, ``compare``, ``ablate``, ``analyze`` and ``roma``. Each gives one
``error:`` line naming the field or file, exit 2, no traceback, and loses nothing on disk
(helpers_bad_inputs). Cases that need a run work on a copy of one trained tiny run."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers_bad_inputs import (
    NO_CUDA,
    Case,
    check_case,
    check_case_in_subprocess,
    params,
    train_args,
    train_tiny_run,
    write,
)
from helpers_cli import CONFIGS


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished tiny run with checkpoints at steps 1 and 2."""
    return train_tiny_run(tmp_path_factory.mktemp("trained"))


# ------------------------------------------------------------------------------- plant helpers


def _checkpoints(tmp: Path) -> list[Path]:
    return sorted((tmp / "run" / "checkpoints").glob("step_*"))


def _edit_states(edit):
    """Apply ``edit(state_dict) -> new state (any JSON)`` to every checkpoint's state.json."""

    def setup(tmp: Path) -> None:
        for checkpoint in _checkpoints(tmp):
            path = checkpoint / "state.json"
            new = edit(json.loads(path.read_text()))
            path.write_text(new if isinstance(new, str) else json.dumps(new))

    return setup


def _each_checkpoint(action):
    def setup(tmp: Path) -> None:
        for checkpoint in _checkpoints(tmp):
            action(checkpoint)

    return setup


def _wrong_shape_model(checkpoint: Path) -> None:
    """Replace a weight by one of another shape and record the new file's SHA-256, so only
    loading it into the model can find the problem."""
    path = checkpoint / "model.safetensors"
    tensors = load_file(str(path))
    name = next(iter(tensors))
    tensors[name] = torch.zeros(3, 3)
    save_file(tensors, str(path))
    state = json.loads((checkpoint / "state.json").read_text())
    state["files"]["model.safetensors"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (checkpoint / "state.json").write_text(json.dumps(state))


def _deep(state: dict) -> str:
    return '{"step": 1, "files": {}, "trainer": ' + "[" * 100_000 + "]" * 100_000 + "}"


def _edit_config(edit):
    def setup(tmp: Path) -> None:
        path = tmp / "run" / "config.json"
        new = edit(json.loads(path.read_text()))
        path.write_text(new if isinstance(new, str) else json.dumps(new))

    return setup


def _set(table: dict, dotted: str, value) -> dict:
    *parents, last = dotted.split(".")
    node = table
    for key in parents:
        node = node[key]
    node[last] = value
    return table


def _metrics(text: str | bytes):
    return write("run/metrics.jsonl", text)


def _study(body: str, name: str = "study.toml"):
    def setup(tmp: Path) -> None:
        (tmp / "base.toml").write_text((CONFIGS / "tiny.toml").read_text())
        (tmp / name).write_text(f'base = "base.toml"\nout_dir = "{tmp}/study"\n{body}\n')

    return setup


def _model_folder(*files: str):
    def setup(tmp: Path) -> None:
        (tmp / "model").mkdir()
        for name in files:
            (tmp / "model" / name).write_text("{}")
        (tmp / "data.txt").write_text("some text\n")

    return setup


def _study_dir(content: str):
    return write("studydir/study.json", content)


RESUME = [*train_args("train.steps=3"), "--out", "{run}", "--resume"]
EVAL = ["eval", "{run}", "--device", "cpu"]

RUN_CASES = [
    # ---- run folders
    Case(
        "run-exists-without-flags",
        [*train_args(), "--out", "{run}"],
        ("run", "already holds a run", "--resume"),
        needs_run=True,
    ),
    Case(
        "resume-with-changed-config",
        [*train_args("optim.lr=0.5"), "--out", "{run}", "--resume"],
        ("cannot resume", "optim.lr"),
        needs_run=True,
    ),
    Case(
        "overwrite-config-json-only-folder",
        [*train_args(), "--out", "{tmp}/old", "--overwrite"],
        ("old", "holds no moealign run"),
        setup=write("old/config.json", "{}"),
    ),
    Case(
        "run-folder-is-a-file",
        [*train_args(), "--out", "{tmp}/run", "--resume"],
        ("--out", "not a folder"),
        setup=write("run", "a file"),
    ),
    # ---- checkpoints: every checkpoint of the run broken the same way
    Case(
        "resume-checkpoint-files-emptied",
        RESUME,
        ("no usable checkpoint", "no checksum for model.safetensors"),
        needs_run=True,
        setup=_edit_states(lambda s: {**s, "files": {}}),
    ),
    Case(
        "eval-checkpoint-files-emptied",
        EVAL,
        ("no usable checkpoint", "model.safetensors"),
        needs_run=True,
        setup=_edit_states(lambda s: {**s, "files": {}}),
    ),
    Case(
        "eval-optimizer-checksum-dropped",
        EVAL,
        ("no checksum for optimizer.safetensors",),
        needs_run=True,
        setup=_edit_states(
            lambda s: {**s, "files": {"model.safetensors": s["files"]["model.safetensors"]}}
        ),
    ),
    Case(
        "resume-state-not-json",
        RESUME,
        ("state.json", "not valid JSON"),
        needs_run=True,
        setup=_edit_states(lambda s: "{not json"),
    ),
    Case(
        "resume-state-deeply-nested",
        RESUME,
        ("state.json", "nested too deeply"),
        needs_run=True,
        setup=_edit_states(_deep),
    ),
    Case(
        "resume-state-step-a-string",
        RESUME,
        ("state.json", "step 'x'"),
        needs_run=True,
        setup=_edit_states(lambda s: {**s, "step": "x"}),
    ),
    Case(
        "resume-state-without-trainer",
        RESUME,
        ("state.json", "missing key 'trainer'"),
        needs_run=True,
        setup=_edit_states(lambda s: {k: v for k, v in s.items() if k != "trainer"}),
    ),
    Case(
        "resume-state-a-list",
        RESUME,
        ("state.json", "a JSON list"),
        needs_run=True,
        setup=_edit_states(lambda s: [s]),
    ),
    Case(
        "resume-state-step-mismatch",
        RESUME,
        ("state.json", "does not match the folder name"),
        needs_run=True,
        setup=_edit_states(lambda s: {**s, "step": s["step"] + 10}),
    ),
    Case(
        "resume-state-bad-dtype",
        RESUME,
        ("no usable checkpoint", "not a torch dtype"),
        needs_run=True,
        setup=_edit_states(
            lambda s: {
                **s,
                "trainer": {
                    **s["trainer"],
                    "x": {"__tensor_data__": {"dtype": "load", "shape": [1], "values": [0]}},
                },
            }
        ),
    ),
    Case(
        "resume-state-bad-scheduler",
        RESUME,
        ("no usable checkpoint", "cannot be loaded"),
        needs_run=True,
        setup=_edit_states(lambda s: {**s, "trainer": {**s["trainer"], "scheduler": 3}}),
    ),
    Case(
        "resume-state-missing-rng",
        RESUME,
        ("no usable checkpoint", "cannot be loaded", "rng"),
        needs_run=True,
        setup=_edit_states(
            lambda s: {**s, "trainer": {k: v for k, v in s["trainer"].items() if k != "rng"}}
        ),
    ),
    Case(
        "resume-model-truncated",
        RESUME,
        ("model.safetensors", "corrupt or truncated"),
        needs_run=True,
        setup=_each_checkpoint(
            lambda c: (c / "model.safetensors").write_bytes(
                (c / "model.safetensors").read_bytes()[:100]
            )
        ),
    ),
    Case(
        "resume-model-wrong-shape",
        RESUME,
        ("no usable checkpoint", "cannot be loaded"),
        needs_run=True,
        setup=_each_checkpoint(_wrong_shape_model),
    ),
    Case(
        "eval-model-wrong-shape",
        EVAL,
        ("no usable checkpoint", "cannot be loaded"),
        needs_run=True,
        setup=_each_checkpoint(_wrong_shape_model),
    ),
    Case(
        "resume-optimizer-missing",
        RESUME,
        ("optimizer.safetensors is missing",),
        needs_run=True,
        setup=_each_checkpoint(lambda c: (c / "optimizer.safetensors").unlink()),
    ),
    Case(
        "resume-optimizer-garbage",
        RESUME,
        ("optimizer.safetensors", "corrupt or truncated"),
        needs_run=True,
        setup=_each_checkpoint(lambda c: (c / "optimizer.safetensors").write_bytes(b"\0" * 64)),
    ),
    Case(
        "eval-no-checkpoint",
        EVAL,
        ("holds no checkpoint",),
        needs_run=True,
        setup=_each_checkpoint(shutil.rmtree),
    ),
    # ---- eval arguments and run configs
    Case("eval-task-examples-negative", [*EVAL, "--task-examples", "-5"], ("--task-examples",)),
    Case("eval-arg-batches-zero", [*EVAL, "--eval-batches", "0"], ("--eval-batches", ">= 1")),
    Case("eval-batches-word", [*EVAL, "--eval-batches", "abc"], ("--eval-batches", "'abc'")),
    Case("eval-device-unknown", [*EVAL[:2], "--device", "tpu"], ("--device", "'tpu'")),
    Case(
        "eval-device-cuda",
        [*EVAL[:2], "--device", "cuda"],
        ("--device", "CUDA"),
        needs_run=True,
        skip=NO_CUDA,
    ),
    Case("eval-missing-folder", ["eval", "{tmp}/nope"], ("RUN_DIR", "nope", "holds no run")),
    Case(
        "eval-folder-without-run",
        ["eval", "{tmp}/empty"],
        ("RUN_DIR", "empty", "no config.json"),
        setup=lambda tmp: (tmp / "empty").mkdir(),
    ),
    Case(
        "eval-config-corrupt",
        EVAL,
        ("config.json", "not valid JSON"),
        needs_run=True,
        setup=_edit_config(lambda c: '{"model": '),
    ),
    Case(
        "eval-config-a-list",
        EVAL,
        ("config.json", "a JSON list"),
        needs_run=True,
        setup=_edit_config(lambda c: [c]),
    ),
    Case(
        "eval-config-not-utf8",
        EVAL,
        ("config.json", "not UTF-8"),
        needs_run=True,
        setup=write("run/config.json", b'{"name": "caf\xe9"}'),
    ),
    Case(
        "eval-config-bad-value",
        EVAL,
        ("config.json", "model.n_experts"),
        needs_run=True,
        setup=_edit_config(lambda c: _set(c, "model.n_experts", 0)),
    ),
    Case(
        "eval-config-bad-router-option",
        EVAL,
        ("config.json", "model.router_options.bogus"),
        needs_run=True,
        setup=_edit_config(lambda c: _set(c, "model.router_options", {"bogus": 1})),
    ),
    # ---- data files of data.source = "files" (found when the data is read)
    Case(
        "data-file-not-utf8",
        train_args("data.source=files", 'data.paths=["{tmp}/d.txt"]'),
        ("d.txt", "not valid UTF-8"),
        setup=write("d.txt", b"caf\xe9 " * 100),
    ),
    Case(
        "data-file-empty",
        train_args("data.source=files", 'data.paths=["{tmp}/d.txt"]'),
        ("d.txt", "empty"),
        setup=write("d.txt", ""),
    ),
    Case(
        "data-jsonl-bad-line",
        train_args("data.source=files", 'data.paths=["{tmp}/d.jsonl"]'),
        ("d.jsonl:2", "not valid JSON"),
        setup=write("d.jsonl", '{"text": "a"}\n{"text": oops}\n{"text": "c"}\n'),
    ),
    Case(
        "data-jsonl-missing-field",
        train_args("data.source=files", 'data.paths=["{tmp}/d.jsonl"]'),
        ("d.jsonl line 1", "'text'"),
        setup=write("d.jsonl", '{"body": "a"}\n'),
    ),
    Case(
        "data-jsonl-not-objects",
        train_args("data.source=files", 'data.paths=["{tmp}/d.jsonl"]'),
        ("d.jsonl:1", "a JSON list"),
        setup=write("d.jsonl", "[1, 2]\n"),
    ),
    # ---- report and compare
    Case("report-missing", ["report", "{tmp}/nope"], ("nope", "expected a run directory")),
    Case(
        "report-corrupt-middle-line",
        ["report", "{run}", "--out", "{tmp}/r"],
        ("metrics.jsonl:1", "not valid JSON"),
        needs_run=True,
        setup=lambda tmp: (tmp / "run/metrics.jsonl").write_text(
            "{oops\n" + (tmp / "run/metrics.jsonl").read_text()
        ),
    ),
    Case(
        "report-metrics-not-utf8",
        ["report", "{run}", "--out", "{tmp}/r"],
        ("metrics.jsonl", "not UTF-8"),
        needs_run=True,
        setup=_metrics(b'{"step": 1, "name": "caf\xe9"}\n'),
    ),
    Case(
        "report-final-eval-a-list",
        ["report", "{run}", "--out", "{tmp}/r"],
        ("final_eval.json", "a JSON list"),
        needs_run=True,
        setup=write("run/final_eval.json", "[1]"),
    ),
    Case(
        "report-meta-corrupt",
        ["report", "{run}", "--out", "{tmp}/r"],
        ("meta.json", "not valid JSON"),
        needs_run=True,
        setup=write("run/meta.json", "{"),
    ),
    Case(
        "report-study-not-json",
        ["report", "{tmp}/studydir", "--out", "{tmp}/r"],
        ("study.json", "not valid JSON"),
        setup=_study_dir("{"),
    ),
    Case(
        "report-study-cells-not-a-list",
        ["report", "{tmp}/studydir", "--out", "{tmp}/r"],
        ("study.json", "cells must be a list"),
        setup=_study_dir('{"cells": 3}'),
    ),
    Case(
        "report-study-cell-without-seed",
        ["report", "{tmp}/studydir", "--out", "{tmp}/r"],
        ("study.json", "seed"),
        setup=_study_dir('{"cells": [{"run_dir": "x", "variant": "v"}]}'),
    ),
    Case(
        "report-unknown-baseline",
        ["report", "{run}", "--out", "{tmp}/r", "--baseline", "nope"],
        ("--baseline", "'nope'"),
        needs_run=True,
    ),
    Case(
        "report-target-loss-word",
        ["report", "{run}", "--target-loss", "low"],
        ("--target-loss", "'low'"),
    ),
    Case("compare-missing", ["compare", "{run}", "{tmp}/nope"], ("nope",), needs_run=True),
    # ---- ablate: study files
    Case("ablate-missing", ["ablate", "{tmp}/nope.toml"], ("study file", "does not exist")),
    Case("ablate-a-folder", ["ablate", "{tmp}"], ("study file", "is a folder")),
    Case(
        "ablate-binary",
        ["ablate", "{tmp}/s.toml"],
        ("study file", "not UTF-8"),
        setup=write("s.toml", bytes(range(256))),
    ),
    Case(
        "ablate-seed-axis",
        ["ablate", "{tmp}/study.toml", "--dry-run"],
        ("axes.train.seed", "seeds"),
        setup=_study('[axes]\n"train.seed" = [1, 2]'),
    ),
    Case(
        "ablate-seed-override",
        ["ablate", "{tmp}/study.toml", "--dry-run"],
        ("overrides.train.seed",),
        setup=_study('[overrides]\n"train.seed" = 5'),
    ),
    Case(
        "ablate-seed-in-variant",
        ["ablate", "{tmp}/study.toml", "--dry-run"],
        ("variants.v.train.seed",),
        setup=_study('[[variants]]\nname = "v"\noverrides = { "train.seed" = 7 }'),
    ),
    Case(
        "ablate-bad-router-option-dry-run",
        ["ablate", "{tmp}/study.toml", "--dry-run"],
        ("study cell", "model.router_options.bogus"),
        setup=_study('[axes]\n"model.router_options" = [{bogus = 1}]'),
    ),
    Case(
        "ablate-missing-data-file-dry-run",
        ["ablate", "{tmp}/study.toml", "--dry-run"],
        ("study cell", "data.paths[0]"),
        setup=_study(
            '[overrides]\n"data.source" = "files"\n"data.paths" = ["nope.txt"]\n'
            '"optim.warmup_steps" = 1'
        ),
    ),
    Case(
        "ablate-base-missing",
        ["ablate", "{tmp}/s.toml"],
        ("base", "an existing config file"),
        setup=write("s.toml", 'base = "nope.toml"\n'),
    ),
    Case(
        "ablate-seeds-empty",
        ["ablate", "{tmp}/study.toml"],
        ("seeds",),
        setup=_study("seeds = []"),
    ),
    Case(
        "ablate-seeds-repeated",
        ["ablate", "{tmp}/study.toml"],
        ("seeds", "distinct"),
        setup=_study("seeds = [1, 1]"),
    ),
    Case(
        "ablate-unknown-key",
        ["ablate", "{tmp}/study.toml"],
        ("study", "'seed'"),
        setup=_study("seed = [1]"),
    ),
    Case(
        "ablate-baseline-not-a-variant",
        ["ablate", "{tmp}/study.toml"],
        ("baseline", "'nope'"),
        setup=_study('baseline = "nope"'),
    ),
    Case("ablate-jobs-zero", ["ablate", "x.toml", "--jobs", "0"], ("--jobs", ">= 1")),
    # ---- analyze (checked before transformers loads anything)
    Case(
        "analyze-missing-absolute",
        ["analyze", "/nonexistent/model", "--data", "x.txt"],
        ("model", "does not exist"),
    ),
    Case(
        "analyze-missing-relative",
        ["analyze", "./missing_model", "--data", "x.txt"],
        ("model", "does not exist"),
    ),
    Case(
        "analyze-folder-without-config",
        ["analyze", "{tmp}/model", "--data", "{tmp}/data.txt"],
        ("model", "without config.json"),
        setup=_model_folder(),
    ),
    Case(
        "analyze-folder-without-tokenizer",
        ["analyze", "{tmp}/model", "--data", "{tmp}/data.txt"],
        ("model", "without tokenizer files", "--tokenizer"),
        setup=_model_folder("config.json"),
    ),
    Case(
        "analyze-model-a-file",
        ["analyze", "{tmp}/data.txt", "--data", "{tmp}/data.txt"],
        ("model", "a file"),
        setup=_model_folder(),
    ),
    Case(
        "analyze-data-missing",
        ["analyze", "{tmp}/model", "--data", "{tmp}/nope.txt"],
        ("--data", "nope.txt"),
        setup=_model_folder("config.json", "tokenizer.json"),
    ),
    Case(
        "analyze-tokenizer-missing",
        ["analyze", "{tmp}/model", "--data", "{tmp}/data.txt", "--tokenizer", "./nope/"],
        ("--tokenizer", "does not exist"),
        setup=_model_folder("config.json"),
    ),
    Case(
        "analyze-out-a-file",
        ["analyze", "{tmp}/model", "--data", "{tmp}/data.txt", "--out", "{tmp}/data.txt"],
        ("--out", "not a folder"),
        setup=_model_folder("config.json", "tokenizer.json"),
    ),
    Case(
        "analyze-seq-len-zero",
        ["analyze", "m", "--data", "x", "--seq-len", "0"],
        ("--seq-len", ">= 1"),
    ),
    Case(
        "analyze-no-data",
        ["analyze", "m"],
        ("--data",),
    ),
    # ---- roma
    Case(
        "roma-base-missing",
        ["roma", "--base", "{tmp}/nope", "--out", "{tmp}/o"],
        ("--base", "nope", "holds no run"),
    ),
    Case(
        "roma-layers-beyond-model",
        ["roma", "--base", "{run}", "--out", "{tmp}/o", "--set", "layers=99"],
        ("layers", "99", "2 MoE layers"),
        needs_run=True,
    ),
    Case(
        "roma-k-zero",
        ["roma", "--base", "{run}", "--out", "{tmp}/o", "--set", "k=0"],
        ("k",),
    ),
    Case(
        "roma-unknown-key",
        ["roma", "--base", "{run}", "--out", "{tmp}/o", "--set", "sigmaa=1"],
        ("sigmaa", "unknown key"),
    ),
    Case(
        "roma-out-a-file",
        ["roma", "--base", "{run}", "--out", "{tmp}/f"],
        ("--out", "not a folder"),
        needs_run=True,
        setup=write("f", "x"),
    ),
    Case(
        "roma-device-cuda",
        ["roma", "--base", "{run}", "--out", "{tmp}/o", "--set", "device=cuda"],
        ("device", "CUDA"),
        needs_run=True,
        skip=NO_CUDA,
    ),
    Case(
        "roma-config-missing",
        ["roma", "--base", "{run}", "--out", "{tmp}/o", "--config", "{tmp}/nope.toml"],
        ("nope.toml", "does not exist"),
    ),
]


@pytest.mark.parametrize("case", params(RUN_CASES))
def test_bad_input_is_one_clear_error(case, tmp_path, capsys, monkeypatch, trained_run):
    monkeypatch.chdir(tmp_path)
    check_case(case, tmp_path, capsys, trained_run)


SUBPROCESS_CASES = [
    c
    for c in RUN_CASES
    if c.id
    in ("eval-config-corrupt", "analyze-missing-absolute", "resume-checkpoint-files-emptied")
]


@pytest.mark.parametrize("case", params(SUBPROCESS_CASES))
def test_bad_input_through_a_real_process(case, tmp_path, trained_run):
    check_case_in_subprocess(case, tmp_path, trained_run)
