"""Progress on stderr (moealign.progress) and the shared --quiet/--json of the command line."""

from __future__ import annotations

import io
import json
import re

import pytest

from moealign import cli, progress
from moealign.progress import note, phase, track

JSON_COMMANDS = {"eval", "compare", "compress", "analyze", "roma", "demo", "report"}


@pytest.fixture(autouse=True)
def shown(monkeypatch):
    monkeypatch.setattr(progress, "_QUIET", False)
    monkeypatch.setattr(progress, "_NOTED", set())


def test_plain_lines_when_stderr_is_not_a_terminal(capsys):
    with phase("calibrate", total=20) as bar:
        for _ in range(20):
            bar.update()
        bar.postfix(loss="1.5")
    assert list(track(["a", "b"], "write")) == ["a", "b"]
    assert list(track(iter("xyz"), "stream")) == ["x", "y", "z"]  # no count known ahead
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert out == "" and lines[0] == "calibrate (20)"
    assert lines[1:10] == [f"calibrate: {n}/20" for n in range(2, 20, 2)]  # every tenth
    assert re.fullmatch(r"calibrate: done 20/20 in \d+\.\d s loss=1\.5", lines[10])
    assert lines[11:13] == ["write (2)", "write: 1/2"]
    assert lines[13].startswith("write: done 2/2 in ")
    assert lines[14] == "stream" and lines[15].startswith("stream: done 3 in ")
    assert len(lines) == 16


def test_a_failed_phase_is_not_done(capsys):
    with pytest.raises(ValueError), phase("load", total=4) as bar:
        bar.update()
        raise ValueError("bad")
    assert capsys.readouterr().err == "load (4)\nload: 1/4\n"  # and no "done"


def test_a_bar_on_a_terminal(monkeypatch):
    terminal = io.StringIO()
    terminal.isatty = lambda: True
    monkeypatch.setattr(progress, "_stream", lambda: terminal)
    with phase("train: steps", total=5) as bar:
        bar.update(5)
    progress.write("a line between bars")
    text = terminal.getvalue()
    assert "train: steps" in text and "5/5" in text and "\r" in text  # tqdm redraws in place
    assert "a line between bars\n" in text


def test_quiet_silences_progress_but_not_notes(capsys):
    progress.set_quiet(True)
    with phase("x", total=3) as bar:
        bar.update(3)
    progress.write("y")
    note("optim.warmup_steps=5 > train.steps=2; using 2")
    note("optim.warmup_steps=5 > train.steps=2; using 2")  # once per process
    assert capsys.readouterr() == ("", "note: optim.warmup_steps=5 > train.steps=2; using 2\n")


def test_json_and_quiet_options_of_each_command():
    subparsers = next(
        action for action in cli.build_parser()._actions if action.dest == "command"
    ).choices
    with_json = {name for name, sub in subparsers.items() if "--json" in sub._option_string_actions}
    assert with_json == JSON_COMMANDS
    assert all("--quiet" in sub._option_string_actions for sub in subparsers.values())


def test_json_puts_one_document_on_stdout_and_the_rest_on_stderr(monkeypatch, capsys):
    def run(args):
        print("a human table")
        with phase("work", total=1) as bar:
            bar.update()
        return {"command": "compare", "files": {}, "result": {"x": 1.5}}

    command = cli.COMMANDS["compare"]
    monkeypatch.setitem(
        cli.COMMANDS, "compare", cli.Command(command.help, command.add_arguments, run, json=True)
    )
    assert cli.main(["compare", "a", "b", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"command": "compare", "files": {}, "result": {"x": 1.5}}
    assert "a human table" in err and "work (1)" in err
    assert cli.main(["compare", "a", "b"]) == 0  # without --json: the human output on stdout
    out, err = capsys.readouterr()
    assert out == "a human table\n" and "work" in err
    assert cli.main(["compare", "a", "b", "--quiet"]) == 0
    assert capsys.readouterr() == ("a human table\n", "")
