"""The command line boundary: lazy imports, one error line and its exit status, --debug."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers_cli import cli_env
from moealign import cli


def test_help_imports_neither_torch_nor_matplotlib():
    """``import moealign.cli``, ``moealign --help`` and every ``moealign COMMAND --help``."""
    code = (
        "import json, sys\n"
        "import moealign.cli as cli\n"
        "heavy = ('torch', 'matplotlib', 'scipy', 'transformers')\n"
        "found = {'import': [m for m in heavy if m in sys.modules]}\n"
        "for command in ['', *cli.COMMANDS]:\n"
        "    cli.main([command, '--help'] if command else ['--help'])\n"
        "    found[command or '--help'] = [m for m in heavy if m in sys.modules]\n"
        "print(json.dumps(found))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(found) == {"import", "--help", *cli.COMMANDS}
    assert all(modules == [] for modules in found.values()), found


def _failing(error: BaseException):
    def run(args):
        raise error

    return run


@pytest.mark.parametrize(
    ("error", "status", "line"),
    [
        (
            ValueError("model.top_k: got 9\nexpected <= 4"),
            2,
            "error: model.top_k: got 9 expected <= 4",
        ),
        (
            OSError(28, "No space left on device", "/x/metrics.jsonl"),
            2,
            "error: /x/metrics.jsonl: No space left on device",
        ),
        (TypeError("bad type"), 2, "error: bad type"),
        (KeyError("rng"), 1, "error: internal error (KeyError: 'rng'); rerun with --debug"),
        (KeyboardInterrupt(), 130, "error: interrupted"),
    ],
)
def test_errors_are_one_line_with_their_exit_status(monkeypatch, capsys, error, status, line):
    command = cli.COMMANDS["compare"]
    monkeypatch.setitem(
        cli.COMMANDS, "compare", cli.Command(command.help, command.add_arguments, _failing(error))
    )
    assert cli.main(["compare", "a", "b"]) == status
    err = capsys.readouterr().err
    assert err.splitlines() == [err.splitlines()[0]] and err.startswith(line), err
    assert "Traceback" not in err


def test_debug_shows_the_traceback(monkeypatch, capsys):
    command = cli.COMMANDS["compare"]
    monkeypatch.setitem(
        cli.COMMANDS,
        "compare",
        cli.Command(command.help, command.add_arguments, _failing(KeyError("x"))),
    )
    assert cli.main(["--debug", "compare", "a", "b"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: internal error")


def test_a_safetensors_error_is_a_user_error(monkeypatch, capsys):
    from safetensors import SafetensorError

    command = cli.COMMANDS["compare"]
    error = SafetensorError("Error while deserializing header: HeaderTooLarge")
    monkeypatch.setitem(
        cli.COMMANDS, "compare", cli.Command(command.help, command.add_arguments, _failing(error))
    )
    assert cli.main(["compare", "a", "b"]) == 2
    assert capsys.readouterr().err == "error: Error while deserializing header: HeaderTooLarge\n"
