"""Ablation studies: grid expansion and validation, resumable runs, failed cells recorded."""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import tomllib

from helpers_cli import CONFIGS
from moealign.cli import main
from moealign.config import ConfigError, load_config
from moealign.io import read_jsonl
from moealign.studies.ablate import (
    Cell,
    CellResult,
    _Progress,
    classify_run,
    expand_axes,
    first_nonfinite_step,
    load_study,
    run_study,
    toml_literal,
)
from moealign.training.trainer import Trainer

# A few-step run of the tiny config on the task suite alone (no stdlib text to read).
FAST = {
    "train.steps": 4,
    "optim.warmup_steps": 1,
    "train.log_every": 1,
    "train.eval_every": 2,
    "train.checkpoint_every": 2,
    "train.eval_batches": 1,
    "data.source": "tasks",
    "data.examples_per_task": 10,
    "train.device": "cpu",
}


def write_study(tmp_path, body: str, fast: bool = True) -> str:
    (tmp_path / "base.toml").write_text((CONFIGS / "tiny.toml").read_text())
    fixed = "".join(f'"{k}" = {toml_literal(v)}\n' for k, v in FAST.items()) if fast else ""
    path = tmp_path / "study.toml"
    path.write_text(f'base = "base.toml"\n{body}\n[overrides]\n{fixed}')
    return path


@pytest.mark.parametrize(
    "value",
    [
        "plain",
        'quote " and \\ backslash\nnewline\ttab \x7f é',
        0,
        -3,
        1e-3,
        2.5e20,
        math.inf,
        True,
        [0.9, 0.95],
        {"c_prime": 2.0, "nested": {"x": [1, "a"]}},
    ],
)
def test_toml_literal_round_trips_through_tomllib(value):
    assert tomllib.loads(f"v = {toml_literal(value)}")["v"] == value


def test_grid_is_the_product_of_axes_times_seeds_plus_named_variants(tmp_path):
    path = write_study(
        tmp_path,
        """
seeds = [0, 1, 2]
baseline = "router=softmax_topk,lr=0.003"
[axes]
"model.router" = ["softmax_topk", "mpi"]
"optim.lr" = [3e-3, 1e-2]
[baselines]
"router=mpi,lr=0.01" = "router=softmax_topk,lr=0.01"
[[variants]]
name = "no_balance"
overrides = { "loss.balance_coef" = 0.0 }
""",
    )
    study = load_study(path, out_dir=tmp_path / "out")
    assert study.baselines == {"router=mpi,lr=0.01": "router=softmax_topk,lr=0.01"}
    assert study.to_dict()["baselines"] == study.baselines
    grid = [f"router={r},lr={lr}" for r in ("softmax_topk", "mpi") for lr in ("0.003", "0.01")]
    assert list(study.variants) == [*grid, "no_balance"]
    assert [c.name for c in study.cells] == [
        f"{variant}__seed{seed}" for seed in (0, 1, 2) for variant in study.variants
    ]
    assert len({c.run_dir for c in study.cells}) == 15
    assert all(c.run_dir.parent == tmp_path / "out" for c in study.cells)
    cell = next(c for c in study.cells if c.name == "router=mpi,lr=0.01__seed2")
    config = load_config(study.base_config, list(cell.overrides))
    assert (config.model.router, config.optim.lr, config.train.seed) == ("mpi", 0.01, 2)
    assert config.train.steps == FAST["train.steps"]  # the fixed overrides apply too
    named = next(c for c in study.cells if c.variant == "no_balance")
    assert load_config(study.base_config, list(named.overrides)).loss.balance_coef == 0.0


def test_axes_sharing_a_last_key_part_use_the_whole_key():
    names = list(expand_axes({"model.seed_x.n": [1], "data.seed_x.n": [2, 3]}))
    assert names == ["model.seed_x.n=1,data.seed_x.n=2", "model.seed_x.n=1,data.seed_x.n=3"]


@pytest.mark.parametrize(
    ("body", "fragments"),
    [
        ('[axes]\n"optim.lr" = [0.1, -1]', ["'lr=-1__seed0'", "optim.lr", "-1", "> 0"]),
        ('[axes]\n"optim.lrr" = [0.1]', ["'lrr=0.1__seed0'", "optim.lrr", "unknown key"]),
        (
            '[[variants]]\nname = "typo"\noverrides = { "train.stepz" = 3 }',
            ["'typo__seed0'", "train.stepz"],
        ),
        ('baseline = "nope"\n[axes]\n"optim.lr" = [0.1]', ["baseline", "'nope'", "lr=0.1"]),
        ("seeds = [0, 0]", ["seeds", "distinct"]),
        ('[axes]\n"optim.lr" = []', ["axes.optim.lr", "non-empty"]),
        ('[[variants]]\nname = "a/b"', ["variants[0].name", "'a/b'"]),
        ("sedes = [1]", ["study", "sedes"]),
        ('[axes]\n"optim.lr" = [0.1]\n[baselines]\nnope = "lr=0.1"', ["baselines", "'nope'"]),
        (
            '[axes]\n"optim.lr" = [0.1, 0.2]\n[baselines]\n"lr=0.1" = "lr=0.1"',
            ["baselines.lr=0.1", "another variant"],
        ),
    ],
)
def test_bad_study_gives_one_error_naming_the_cell_and_field(tmp_path, body, fragments):
    with pytest.raises(ConfigError) as error:
        load_study(write_study(tmp_path, body))
    for fragment in fragments:
        assert fragment in str(error.value)


def test_status_comes_from_the_metrics_log(tmp_path):
    metrics = [
        {"step": 1, "split": "train", "loss": 2.0},
        {"step": 2, "split": "val", "val_loss": 1.5},
        {"step": 3, "split": "train", "loss": float("nan")},
    ]
    assert first_nonfinite_step(metrics) == 3
    assert first_nonfinite_step(metrics[:2]) is None
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics[:2]))
    assert classify_run(tmp_path, returncode=1) == ("failed", None)
    assert classify_run(tmp_path, returncode=0) == ("interrupted", None)
    (tmp_path / "final_eval.json").write_text("{}")
    assert classify_run(tmp_path) == ("finished", None)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    assert classify_run(tmp_path) == ("diverged", 3)


def test_dry_run_lists_the_cells(tmp_path, capsys):
    path = write_study(tmp_path, 'seeds = [0, 1]\n[axes]\n"model.top_k" = [1, 2]')
    assert main(["ablate", str(path), "--dry-run", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "4 cells" in out and "top_k=2__seed1" in out and "model.top_k=1" in out
    assert not (tmp_path / "o").exists()


def _cells(study_dir):
    return {c["cell"]: c for c in json.loads((study_dir / "study.json").read_text())["cells"]}


def _attempts(study_dir):
    return [record["cell"] for record in read_jsonl(study_dir / "cells.jsonl")]


def test_failing_cells_are_recorded_and_the_study_goes_on(tmp_path, capsys, monkeypatch):
    path = write_study(
        tmp_path,
        """
[[variants]]
name = "huge_lr"
overrides = { "optim.lr" = 1e4, "optim.grad_clip" = 0.0, "optim.warmup_steps" = 0 }
[[variants]]
name = "empty_file"
overrides = { "data.source" = "files", "data.paths" = ["empty.txt"] }
""",
    )
    (tmp_path / "empty.txt").write_text("")  # exists (passes the preflight), fails when read
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "study"
    status = main(["ablate", str(path), "--jobs", "2", "--out", str(out)])
    assert status == 1  # a failed cell makes the exit status non-zero, after every cell ran
    cells = _cells(out)
    assert cells["huge_lr__seed0"]["status"] == "diverged"
    log = (out / "huge_lr__seed0/metrics.jsonl").read_text().splitlines()

    def refuse(constant):  # metrics.jsonl is strict JSON: no NaN or Infinity
        raise ValueError(constant)

    records = [json.loads(line, parse_constant=refuse) for line in log]
    # The divergence guard stops the run at its first non-finite step (an event); that step's
    # record names its non-finite values, written as null.
    first_bad = next(r["step"] for r in records if r.get("nonfinite"))
    event = records[-1]
    assert (event["step"], event["event"], event["policy"]) == (first_bad, "nonfinite", "stop")
    assert cells["huge_lr__seed0"]["diverged_step"] == first_bad
    assert cells["huge_lr__seed0"]["returncode"] == 1
    failed = cells["empty_file__seed0"]
    assert failed["status"] == "failed" and failed["returncode"] == 2
    assert "empty.txt" in failed["error"] and "is empty" in failed["error"]
    assert "empty.txt" in (out / "logs/empty_file__seed0.log").read_text()
    printed = "".join(capsys.readouterr())  # the table on stdout, the progress on stderr
    assert f"diverged at step {first_bad}" in printed and "failed: " in printed
    # One line per cell as it starts and as it ends; the first to end estimates the rest.
    lines = printed.splitlines()
    starts = [line for line in lines if re.match(r"\[\d/2\] start ", line)]
    ends = [line for line in lines if re.match(r"\[\d/2\] end ", line)]
    assert len(starts) == 2 and len(ends) == 2
    duration = r"(\d+ min )?\d+ s"  # a loaded machine takes minutes
    assert re.search(rf"^\[1/2\] end   \S+ after {duration}: .+; 1 left, ETA {duration}$", ends[0])
    assert "ETA" not in ends[1]
    diverged = next(line for line in ends if "huge_lr__seed0" in line)
    assert f"diverged at step {first_bad}" in diverged


def _finished_cell(run_dir, val_loss):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "split": "train", "loss": 1}))
    (run_dir / "final_eval.json").write_text(json.dumps({"val_loss": val_loss}))


def test_quiet_silences_the_progress_lines(tmp_path, capsys):
    path = write_study(tmp_path, "seeds = [0, 1]")
    for seed in (0, 1):
        _finished_cell(tmp_path / "o" / f"base__seed{seed}", 2.0)
    argv = ["ablate", str(path), "--out", str(tmp_path / "o")]
    assert main(argv) == 0
    assert "2 of 2 cells already finished; 0 to run" in capsys.readouterr().err
    assert main([*argv, "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "already finished" not in err and "base__seed1  finished" in out


def test_progress_lines_give_status_wall_time_loss_and_eta(tmp_path):
    lines = []
    progress = _Progress(total=5, jobs=2, write=lines.append)
    cell = Cell("a__seed0", "a", 0, (), tmp_path / "a__seed0")
    progress.start(cell)
    _finished_cell(cell.run_dir, 3.14159)
    result = CellResult(cell.name, "a", 0, str(cell.run_dir), "", status="finished", wall_s=10.4)
    progress.end(result)
    failed = CellResult("b__seed0", "b", 0, str(tmp_path / "b"), "", status="failed", wall_s=200)
    failed.error = "ValueError: bad"
    progress.end(failed)
    assert lines[0] == "[1/5] start a__seed0"
    # ETA: mean wall time of the ended cells × ⌈cells left / jobs⌉.
    assert lines[1] == (
        "[1/5] end   a__seed0 after 10 s: finished, val loss 3.142; 4 left, ETA 21 s"
    )
    assert lines[2] == (
        "[2/5] end   b__seed0 after 3 min 20 s: failed: ValueError: bad; 3 left, ETA 3 min 30 s"
    )


@pytest.mark.slow
def test_an_interrupted_study_resumes_without_rerunning_finished_cells(tmp_path):
    path = write_study(tmp_path, "seeds = [0, 1]")
    study = load_study(path, out_dir=tmp_path / "study")
    half, fresh = study.cells
    # Cell seed 0 was stopped at step 2 (checkpoint written, no final evaluation).
    config = load_config(study.base_config, [*half.overrides, f'name="{half.name}"'])
    trainer = Trainer(config, run_dir=half.run_dir, progress=False)
    assert trainer.train(stop_at=2).interrupted
    trainer.close()  # releases the run folder's lock for the cell's own process

    lines = []
    results = run_study(study, jobs=2, progress=lines.append)
    assert [r.status for r in results] == ["finished", "finished"]
    assert len(lines) == 4 and sum("ETA" in line for line in lines) == 1
    assert "--resume" in results[0].command and "--resume" not in results[1].command
    meta = json.loads((half.run_dir / "meta.json").read_text())
    assert len(meta["resumed"]) == 1
    log = (half.run_dir / "metrics.jsonl").read_text().splitlines()
    train_steps = [r["step"] for r in map(json.loads, log) if r["split"] == "train"]
    assert train_steps == [1, 2, 3, 4]  # no records doubled or lost by the resume
    assert sorted(_attempts(study.out_dir)) == sorted([half.name, fresh.name])

    # A second invocation finds everything finished and runs nothing.
    mtimes = {c.name: (c.run_dir / "final_eval.json").stat().st_mtime_ns for c in study.cells}
    run_study(study)
    assert len(_attempts(study.out_dir)) == 2
    # Cell seed 1 lost its final evaluation: only it runs again, continuing from its checkpoint.
    (fresh.run_dir / "final_eval.json").unlink()
    results = run_study(study)
    assert _attempts(study.out_dir)[2:] == [fresh.name]
    assert "--resume" in results[1].command and results[1].status == "finished"
    assert (half.run_dir / "final_eval.json").stat().st_mtime_ns == mtimes[half.name]
    assert {c["status"] for c in _cells(study.out_dir).values()} == {"finished"}


@pytest.mark.slow
def test_sigterm_reaches_the_running_cell_and_the_study_is_recorded_interrupted(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from helpers_cli import cli_env
    from moealign.training.checkpoint import load_latest

    path = write_study(tmp_path, 'seeds = [0, 1]\n[[variants]]\nname = "long"')
    long = {**FAST, "train.steps": 100000, "train.checkpoint_every": 0}
    fixed = "".join(f'"{k}" = {toml_literal(v)}\n' for k, v in long.items())
    path.write_text(path.read_text().split("[overrides]")[0] + f"[overrides]\n{fixed}")
    out = tmp_path / "study"
    ablate = subprocess.Popen(
        [sys.executable, "-m", "moealign.cli", "ablate", str(path), "--out", str(out)],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    cell = out / "long__seed0"
    deadline = time.time() + 180
    while time.time() < deadline and len(read_jsonl(cell / "metrics.jsonl")) < 2:
        time.sleep(0.2)
    assert len(read_jsonl(cell / "metrics.jsonl")) >= 2, ablate.poll()
    trainer_pid = int((cell / ".lock").read_text())
    ablate.send_signal(signal.SIGTERM)  # to ablate only, as a job scheduler would
    _, stderr = ablate.communicate(timeout=180)
    assert ablate.returncode == 143, stderr
    assert "error: interrupted by SIGTERM" in stderr and "Traceback" not in stderr
    with pytest.raises(ProcessLookupError):
        os.kill(trainer_pid, 0)  # the cell's trainer stopped too: no orphan
    study = json.loads((out / "study.json").read_text())
    assert study["status"] == "interrupted"
    assert [c["status"] for c in study["cells"]] == ["interrupted", "pending"]
    assert load_latest(cell / "checkpoints").step == max(
        r["step"] for r in read_jsonl(cell / "metrics.jsonl")
    )  # it checkpointed the step it stopped after
