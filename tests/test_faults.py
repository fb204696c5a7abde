"""Faults (issue 23): concurrent commands, signals, kill -9 and what they leave, and valid input
that must be accepted (long names, folders whose name is not UTF-8, runs older than the
marker). See docs/reliability.md."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers_bad_inputs import train_args, train_tiny_run, tree_digest
from helpers_cli import CONFIGS, cli_env
from moealign import cli
from moealign.cli import main
from moealign.io import atomic_directory, remove_temporaries
from moealign.training.runs import MARKER_FILE, folder_kind

HOLD = (
    "import fcntl, os, sys, time\n"
    "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
    "fcntl.flock(fd, fcntl.LOCK_EX)\n"
    "os.write(fd, b'%d' % os.getpid())\n"
    "print('held', flush=True)\n"
    "time.sleep(120)\n"
)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("trained"))


@pytest.fixture
def run(trained_run, tmp_path):
    shutil.copytree(trained_run, tmp_path / "run")
    return tmp_path / "run"


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding ``folder``'s lock, as a training run does."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder / ".lock")], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def _stop(process: subprocess.Popen) -> None:
    process.kill()
    process.wait(timeout=30)


def _dead_pid() -> int:
    """The pid of a process that has exited."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# ------------------------------------------------------------------ readers take the lock


@pytest.mark.parametrize(
    "argv",
    [
        ["export", "{run}", "{tmp}/hf"],
        ["compress", "{run}", "--method", "frequency", "--keep-experts", "2", "--out", "{tmp}/c"],
    ],
    ids=["export", "compress"],
)
def test_readers_of_a_checkpoint_wait_for_no_writer(argv, run, tmp_path, capsys):
    """Training (which rotates checkpoints) holds the run's lock: export and compress read
    under a shared lock, so they are refused with one line instead of failing mid-read."""
    holder = _hold_lock(run)
    try:
        before = tree_digest(tmp_path)
        args = [a.replace("{run}", str(run)).replace("{tmp}", str(tmp_path)) for a in argv]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"in use by process {holder.pid}" in err and err.count("error:") == 1
        assert tree_digest(tmp_path) == before
        assert not (tmp_path / "hf").exists() and not (tmp_path / "c").exists()
    finally:
        _stop(holder)


def test_a_second_ablate_of_one_study_is_refused(tmp_path, capsys):
    (tmp_path / "base.toml").write_text((CONFIGS / "tiny.toml").read_text())
    (tmp_path / "study.toml").write_text(f'base = "base.toml"\nout_dir = "{tmp_path}/s"\n')
    (tmp_path / "s").mkdir()
    holder = _hold_lock(tmp_path / "s")
    try:
        assert main(["ablate", str(tmp_path / "study.toml"), "--quiet"]) == 2
        assert f"in use by process {holder.pid}" in capsys.readouterr().err
        assert not (tmp_path / "s" / "study.json").exists()  # nothing recorded, no "finished"
    finally:
        _stop(holder)


# ------------------------------------------------------------------ signals


def test_sigterm_to_any_command_is_one_line_and_143(monkeypatch, capsys):
    def run(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the signal arrives first
        return 0

    monkeypatch.setitem(cli.COMMANDS, "eval", cli.Command("eval", cli._eval_arguments, run))
    assert main(["eval", "somewhere"]) == 143
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "SIGTERM" in err and "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored


@pytest.mark.slow
def test_sigterm_to_a_real_eval_process(run):
    process = subprocess.Popen(
        [sys.executable, "-m", "moealign.cli", "eval", str(run), "--device", "cpu"],
        env=cli_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300  # once the command runs, it holds the run's lock
    while time.time() < deadline and (run / ".lock").read_text().strip() != str(process.pid):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    if process.returncode == 0:  # finished before the signal: nothing to check
        pytest.skip("eval finished before SIGTERM arrived")
    assert process.returncode == 143, stderr
    assert stderr.count("error:") == 1 and "SIGTERM" in stderr and "Traceback" not in stderr


@pytest.mark.slow
def test_kill_9_of_ablate_leaves_no_orphan_cell(tmp_path):
    """The cell's train process gets SIGTERM when ablate dies (PR_SET_PDEATHSIG): it saves a
    checkpoint and stops, releasing the cell's lock for the rerun."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    (tmp_path / "base.toml").write_text((CONFIGS / "tiny.toml").read_text())
    (tmp_path / "study.toml").write_text(
        f'base = "base.toml"\nout_dir = "{tmp_path}/s"\n[overrides]\n'
        '"train.steps" = 100000\n"optim.warmup_steps" = 1\n"data.source" = "tasks"\n'
        '"train.device" = "cpu"\n"train.checkpoint_every" = 0\n'
    )
    ablate = subprocess.Popen(
        [sys.executable, "-m", "moealign.cli", "ablate", str(tmp_path / "study.toml")],
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    lock = tmp_path / "s" / "base__seed0" / ".lock"
    deadline = time.time() + 120
    while time.time() < deadline and not (lock.exists() and lock.read_text().strip()):
        time.sleep(0.1)
    cell = int(lock.read_text())
    ablate.kill()
    ablate.wait(timeout=30)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            os.kill(cell, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.kill(cell, signal.SIGKILL)
        pytest.fail(f"cell process {cell} kept training after ablate was killed")


# ------------------------------------------------------------------ kill -9 leftovers


def test_temporaries_of_a_dead_writer_are_removed_a_live_ones_kept(tmp_path):
    dead, live = _dead_pid(), os.getppid()
    (tmp_path / f".tmp-{dead}-hf-abc").mkdir()
    (tmp_path / f".tmp-{dead}-hf-abc" / "model.safetensors").write_bytes(b"half")
    (tmp_path / f".tmp-{live}-other-xyz").mkdir()
    (tmp_path / ".tmp-notes.txt").write_text("a user's file")
    with atomic_directory(tmp_path / "hf") as folder:
        (folder / "x").write_text("1")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f".tmp-{live}-other-xyz", ".tmp-notes.txt", "hf"]
    assert remove_temporaries(tmp_path) == [tmp_path / ".tmp-notes.txt"]  # under a lock only


# ------------------------------------------------------------------ valid input accepted


def test_a_250_byte_out_name_is_accepted(tmp_path):
    name = "é" * 125  # 250 bytes in UTF-8
    with atomic_directory(tmp_path / name) as folder:
        (folder / "f").write_text("x")
    assert (tmp_path / name / "f").read_text() == "x"
    from moealign.io import atomic_write_text

    atomic_write_text(tmp_path / ("a" * 255), "y")
    assert (tmp_path / ("a" * 255)).read_text() == "y"


def test_export_to_a_250_byte_out_name(run, tmp_path, capsys):
    out = tmp_path / ("m" * 250)
    assert main(["export", str(run), str(out)]) == 0, capsys.readouterr().err
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()


def test_report_of_a_run_folder_whose_name_is_not_utf8(trained_run, tmp_path, capsys):
    folder = tmp_path / os.fsdecode(b"run-\xff")
    shutil.copytree(trained_run, folder)
    assert main(["report", str(folder), "--out", str(tmp_path / "rep")]) == 0, (
        capsys.readouterr().err
    )
    assert "run-\ufffd" in (tmp_path / "rep" / "report.md").read_text(encoding="utf-8")
    assert folder_kind(tmp_path / "rep") == "report"
    assert main(["report", str(folder), "--out", str(tmp_path / "rep")]) == 0  # its own again


def test_a_run_older_than_the_marker_is_still_a_run(run, capsys):
    """Runs written before the marker are recognised by their meta.json and get the marker on
    resume; checkpoints without an identity are accepted."""
    (run / MARKER_FILE).unlink()
    for state_file in (run / "checkpoints").glob("step_*/state.json"):
        state = json.loads(state_file.read_text())
        del state["trainer"]["identity"]
        state_file.write_text(json.dumps(state))
    assert folder_kind(run) == "run"
    argv = [
        a.replace("{configs}", str(CONFIGS)).replace("{tmp}", str(run.parent))
        for a in train_args("train.steps=3")
    ]
    assert main([*argv, "--out", str(run), "--resume"]) == 0, capsys.readouterr().err
    assert json.loads((run / MARKER_FILE).read_text()) == {"kind": "run", "format": 1}
    assert json.loads((run / "final_eval.json").read_text())["step"] == 3


def test_a_marker_of_a_newer_format_is_refused(run, capsys):
    (run / MARKER_FILE).write_text('{"kind": "run", "format": 99}')
    before = tree_digest(run)
    assert main(["train", "--resume", "--out", str(run)]) == 2
    assert "format 99" in capsys.readouterr().err
    assert tree_digest(run) == before
