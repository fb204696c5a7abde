"""The machinery of the bad-input suite (tests/test_bad_inputs*.py).

A :class:`Case` is one bad input: the ``moealign`` arguments (``{tmp}`` is the case's folder,
``{run}`` a copy of a trained tiny run in it, ``{configs}`` the shipped configs), an optional
``setup(tmp)`` that plants files, the exit status and the fragments its one ``error:`` line
must hold (the field or file it names). :func:`check_case` runs it in-process through
``moealign.cli.main`` and asserts: that exit status, exactly one line starting with
``error:`` on stderr holding every fragment, no traceback, and that every file under the
case's folder that existed before is still there with the same bytes (nothing lost).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from helpers_cli import CONFIGS, cli_env
from moealign.cli import main

# The skip reason of cases that need a machine without CUDA ("" where there is none).
NO_CUDA = "" if not torch.cuda.is_available() else "CUDA is available here"

# A run of a few steps on the task suite alone: it trains in seconds.
FAST_RUN = [
    "data.source=tasks",
    "data.examples_per_task=10",
    "train.steps=2",
    "optim.warmup_steps=1",
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.checkpoint_every=1",
    "train.keep_checkpoints=2",
    "train.task_eval_examples=1",
    "train.device=cpu",
]


@dataclass
class Case:
    id: str
    argv: list[str]
    fragments: tuple[str, ...]
    setup: Callable[[Path], None] | None = None
    status: int = 2
    needs_run: bool = False
    skip: str = ""  # a reason to skip on this machine (e.g. root ignores permissions)


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path → SHA-256 of every regular file under ``root`` (but lock files, which
    hold the pid of their last holder)."""
    digest = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink() and path.name != ".lock":
            digest[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


def expand(argv: list[str], tmp: Path) -> list[str]:
    return [
        arg.replace("{tmp}", str(tmp))
        .replace("{run}", str(tmp / "run"))
        .replace("{configs}", str(CONFIGS))
        for arg in argv
    ]


def assert_one_error_line(status: int, stderr: str, case: Case) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert status == case.status, (status, stderr)
    assert len(errors) == 1, stderr
    for fragment in case.fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def assert_nothing_lost(before: dict[str, str], root: Path) -> None:
    after = tree_digest(root)
    lost = {path for path, digest in before.items() if after.get(path) != digest}
    assert not lost, f"changed or deleted: {sorted(lost)}"


def check_case(case: Case, tmp: Path, capsys, trained_run: Path | None = None) -> str:
    """Run ``case`` in-process; returns its error line (see the module docstring)."""
    if case.needs_run:
        shutil.copytree(trained_run, tmp / "run")
    if case.setup is not None:
        case.setup(tmp)
    before = tree_digest(tmp)
    capsys.readouterr()
    status = main(expand(case.argv, tmp))
    line = assert_one_error_line(status, capsys.readouterr().err, case)
    assert_nothing_lost(before, tmp)
    return line


def check_case_in_subprocess(case: Case, tmp: Path, trained_run: Path | None = None) -> str:
    """:func:`check_case` through a real ``python -m moealign.cli`` process."""
    if case.needs_run:
        shutil.copytree(trained_run, tmp / "run")
    if case.setup is not None:
        case.setup(tmp)
    before = tree_digest(tmp)
    done = subprocess.run(
        [sys.executable, "-m", "moealign.cli", *expand(case.argv, tmp)],
        cwd=tmp,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = assert_one_error_line(done.returncode, done.stderr, case)
    assert_nothing_lost(before, tmp)
    return line


def write(name: str, content: str | bytes) -> Callable[[Path], None]:
    """A ``setup`` that writes ``content`` to ``<case folder>/name``."""

    def setup(tmp: Path) -> None:
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())

    return setup


def params(cases: list[Case]) -> list:
    """``pytest.param``s of ``cases``, named by their ids, skipped where they say so."""
    import pytest

    return [
        pytest.param(case, id=case.id, marks=[pytest.mark.skip(case.skip)] if case.skip else [])
        for case in cases
    ]


def train_tiny_run(root: Path) -> Path:
    """Train the fast tiny run into ``root/run`` (checkpoints at steps 1 and 2); returns it."""
    argv = [a.replace("{configs}", str(CONFIGS)).replace("{tmp}", str(root)) for a in train_args()]
    assert main([*argv, "--out", str(root / "run")]) == 0
    return root / "run"


def train_args(*overrides: str) -> list[str]:
    """``train`` of the tiny config with ``--set`` for each override (the fast run first)."""
    argv = ["train", "--config", "{configs}/tiny.toml", "--no-progress"]
    for override in (*FAST_RUN, 'out_dir="{tmp}/runs"', *overrides):
        argv += ["--set", override]
    return argv
