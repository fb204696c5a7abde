"""Fault tests of run folders (issue 16): --overwrite replaces only a run, one process per run
folder (a lock naming its holder), stale temporaries cleaned, crash-consistent metrics (a torn
line, a resume without a checkpoint, a finished run resumed), and a full disk."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers_bad_inputs import FAST_RUN, assert_nothing_lost, tree_digest
from helpers_cli import CONFIGS, cli_env
from helpers_train import tiny_config
from moealign.cli import main
from moealign.io import read_jsonl
from moealign.training import checkpoint as checkpoint_module
from moealign.training.checkpoint import (
    CheckpointWriteError,
    list_checkpoints,
    load_latest,
    save_checkpoint,
)
from moealign.training.runs import RunDirectory, RunLock, RunLockedError
from moealign.training.trainer import Trainer


def train_argv(out: Path, *overrides: str) -> list[str]:
    argv = ["train", "--config", str(CONFIGS / "tiny.toml"), "--no-progress", "--out", str(out)]
    for override in (*FAST_RUN, *overrides):
        argv += ["--set", override]
    return argv


def steps(run_dir: Path, split: str = "train") -> list[int]:
    return [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("split") == split]


def test_overwrite_replaces_a_run_and_nothing_around_it(tmp_path):
    runs = tmp_path / "runs"
    assert main(train_argv(runs / "a")) == 0
    (runs / "notes.txt").write_text("keep")
    (runs / "b").mkdir()
    (runs / "b" / "config.json").write_text("{}")  # not a run: never replaced
    (runs / "b" / "main.py").write_text("print(1)")
    around = tree_digest(runs / "b") | {"notes": (runs / "notes.txt").read_text()}
    (runs / "a" / "extra.txt").write_text("part of the old run")
    assert main([*train_argv(runs / "a"), "--overwrite"]) == 0
    assert not (runs / "a" / "extra.txt").exists() and steps(runs / "a") == [1, 2]
    assert tree_digest(runs / "b") | {"notes": (runs / "notes.txt").read_text()} == around
    assert main([*train_argv(runs / "b"), "--overwrite"]) == 2
    assert sorted(p.name for p in (runs / "b").iterdir()) == ["config.json", "main.py"]


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding the run folder's lock (as a running `train` does)."""
    code = (
        "import sys, time\n"
        "from moealign.training.runs import RunLock\n"
        "RunLock(sys.argv[1]).acquire()\n"
        "print('locked', flush=True)\n"
        "time.sleep(120)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(folder)], env=cli_env(), stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_locked_run_folder_names_its_holder_and_a_killed_holder_leaves_no_lock(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    holder = _hold_lock(folder)
    try:
        with pytest.raises(RunLockedError, match=f"in use by process {holder.pid}"):
            RunLock(folder).acquire()
        with pytest.raises(RunLockedError):
            RunLock(folder, shared=True).acquire()
    finally:
        holder.kill()  # like kill -9: the kernel drops the flock
        holder.wait()
    with RunLock(folder), RunLock(folder):  # re-entrant within one process
        pass
    with RunLock(folder, shared=True):
        pass


def test_concurrent_resume_is_refused_and_metrics_stay_single(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_argv(run)) == 0
    long = ["train.steps=100000"]  # the only change a resume allows here
    first = subprocess.Popen(
        [sys.executable, "-m", "moealign.cli", *train_argv(run, *long), "--resume"],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        lock = run / ".lock"
        while time.time() < deadline and lock.read_text().strip() != str(first.pid):
            time.sleep(0.1)
        capsys.readouterr()
        assert main([*train_argv(run, *long), "--resume"]) == 2  # refused: `first` holds it
        assert f"in use by process {first.pid}" in capsys.readouterr().err
        while time.time() < deadline and max(steps(run)) < 3:  # `first` is in its loop
            time.sleep(0.1)
    finally:
        first.send_signal(signal.SIGTERM)
        _, stderr = first.communicate(timeout=120)
    assert first.returncode == 143, stderr
    logged = steps(run)
    assert logged == sorted(set(logged)) == list(range(1, max(logged) + 1))


def test_stale_temporaries_are_removed_when_a_run_is_opened(tmp_path):
    config = tiny_config(tmp_path)
    run = RunDirectory.open(tmp_path / "r", config.to_dict(), seed=0, device="cpu")
    run.close()
    (run.checkpoint_dir / ".tmp-step_000003-999").mkdir()  # left by a kill mid-checkpoint
    (run.checkpoint_dir / ".tmp-step_000003-999" / "model.safetensors").write_text("x")
    (run.path / ".tmp-meta.json-x1y2").write_text("half")
    RunDirectory.open(run.path, config.to_dict(), seed=0, device="cpu", resume=True).close()
    assert not list(run.checkpoint_dir.iterdir())
    assert not list(run.path.glob(".tmp-*"))


def test_torn_metrics_line_then_report_compare_and_resume(tmp_path, capsys):
    run = tmp_path / "run"
    config = tiny_config(tmp_path, "train.steps=4", "train.checkpoint_every=2")
    trainer = Trainer(config, run_dir=run, progress=False)
    assert trainer.train(stop_at=2).interrupted
    trainer.close()
    with open(run / "metrics.jsonl", "ab") as handle:  # a crash in the middle of a record
        handle.write(b'{"step": 3, "split": "train", "loss": 1.2')
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    assert main(["compare", str(run), str(run)]) == 0
    resumed = Trainer(config, run_dir=run, resume=True, progress=False)
    assert resumed.train().step == 4
    resumed.close()
    assert steps(run) == [1, 2, 3, 4]
    read_jsonl(run / "metrics.jsonl", tolerate_torn_tail=False)  # the torn line is gone
    assert "error:" not in capsys.readouterr().err


def test_resume_without_a_checkpoint_drops_every_logged_record(tmp_path):
    run = tmp_path / "run"
    config = tiny_config(tmp_path, "train.steps=3")
    first = Trainer(config, run_dir=run, progress=False)
    first.train()
    first.close()
    for checkpoint in list_checkpoints(run / "checkpoints"):
        for file in checkpoint.iterdir():
            file.unlink()
        checkpoint.rmdir()
    again = Trainer(config, run_dir=run, resume=True, progress=False)
    assert again.step == 0
    again.train()
    again.close()
    assert steps(run) == [1, 2, 3] and steps(run, "val") == [0, 3]  # step 0 and the end, once


def test_resuming_a_finished_run_changes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_argv(run)) == 0
    before = tree_digest(run)
    capsys.readouterr()
    assert main([*train_argv(run), "--resume"]) == 0
    assert "already finished at step 2; nothing to do" in capsys.readouterr().out
    assert tree_digest(run) == before


def test_checkpoint_write_on_a_full_disk_keeps_the_previous_one(tmp_path, monkeypatch):
    import torch

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path, 1, model, optimizer, {"a": 1}, keep=1)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_module, "save_file", full)
    with pytest.raises(CheckpointWriteError, match="No space left.*previous checkpoint is kept"):
        save_checkpoint(tmp_path, 2, model, optimizer, {"a": 2}, keep=1)
    assert [p.name for p in tmp_path.iterdir()] == ["step_000001"]
    assert load_latest(tmp_path).trainer_state == {"a": 1}


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return done.returncode == 0


@pytest.mark.slow
def test_a_real_full_disk_gives_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "8m"):
        pytest.skip("mount -t tmpfs is not permitted here (the ENOSPC tests above simulate it)")
    try:
        run = disk / "run"
        argv = train_argv(run, "train.keep_checkpoints=1", "train.task_eval_examples=0")
        assert main([*argv, "--set", "train.steps=2"]) == 0
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(b"\0" * (free - 64 * 1024))  # leave 64 KiB
        before = tree_digest(run / "checkpoints")
        capsys.readouterr()
        status = main([*argv, "--set", "train.steps=4", "--resume"])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert status == 2 and len(errors) == 1 and "Traceback" not in err, err
        assert "No space left on device" in errors[0]
        assert_nothing_lost(before, run / "checkpoints")
        assert load_latest(run / "checkpoints").step == 2
        read_jsonl(run / "metrics.jsonl", tolerate_torn_tail=False)  # no half record
        assert not list((run / "checkpoints").glob(".tmp-*"))
    finally:
        subprocess.run(["umount", str(disk)], check=False)
