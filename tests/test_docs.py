"""Every shell command the documentation shows runs (issue 25): no documented command rots.

Each ```bash block of README.md and docs/*.md is split into commands (a line, with its ``\\``
continuations, here-documents and ``for`` loops), and each command runs with bash in one
scratch folder shared by all pages, in page order (README, then the guides in
:data:`PAGE_ORDER`, then any other page), so that one page's outputs feed the next: the
README's run ``runs/my_text`` is exported there and compressed in docs/compression.md (so a
command's test needs the ones before it: run the whole file). The folder sees
the repository's ``configs``, ``scripts``, ``benchmarks``, ``examples``, ``src`` and ``docs``;
``moealign`` runs this checkout's code, nothing reaches the network. A plain ``moealign ARGS``
line (no shell syntax)
calls ``moealign.cli.main(ARGS)`` in this process, as the ``moealign`` script does, which saves
the interpreter's start and torch's import per command; every other command runs in bash
(``moealign`` there is ``python3 -m moealign.cli``).

Commands that would run long are shrunk by :data:`SHRINK` (fewer steps, examples, tokens):
the same command and code path, smaller numbers. Commands that cannot run here are in
:data:`CANNOT_RUN` with the reason; the README's two set-up lines are run by CI itself. A
rule that matches no documented command fails :func:`test_every_rule_is_used`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGE_ORDER = (
    "README.md",
    "docs/training.md",
    "docs/alignment.md",
    "docs/routers.md",
    "docs/compression.md",
    "docs/huggingface.md",
    "docs/roma.md",
    "docs/scale_out.md",
    "docs/studies.md",
    "docs/development.md",
)
# Pages other branches add (linked from the README and docs/index.md before they exist here).
PENDING_PAGES = (
    "docs/cli.md",
    "docs/json.md",
    "docs/reliability.md",
    "docs/demo.md",
    "docs/engines.md",
)

SETUP_LINES = (
    "bash scripts/setup.sh && moealign demo",
    "bash scripts/setup.sh && python3 -m pytest",
)
_STUDY = (
    "a study's reproduction recipe: hours of CPU time (its pieces, ablate/report/roma/compress/"
    "train, run here shrunk from the guides)"
)
# (page, or a glob of pages; regex on the command) -> why it cannot run in the suite.
CANNOT_RUN = {
    ("README.md", "^bash scripts/setup.sh && "): "the set-up lines: CI runs them itself",
    ("docs/scale_out.md", "--nproc_per_node=8"): "needs 8 GPUs (and a second machine)",
    ("docs/huggingface.md", "^HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 lm_eval "): (
        "needs the page's two task files saved under tasks/ with your data paths; "
        "tests/integrations/test_hf_lm_eval.py runs this command on an export"
    ),
    ("docs/roma.md", "^moealign roma --hf-model path/to/moe"): (
        "needs a transformers MoE model and a questions file of your own; "
        "tests/roma/test_hf_roma_cli.py runs it on a tiny random model"
    ),
    ("docs/*_study.md", ""): _STUDY,
}

_TRAIN = (
    " --set train.steps=4 --set optim.warmup_steps=1 --set train.eval_every=0"
    " --set train.checkpoint_every=0 --set train.eval_batches=1 --set train.task_eval_examples=0"
    " --set data.examples_per_task=20"
)
_ROMA = (
    " --set encoder=builtin --set 'seeds=[0]' --set epochs=1 --set train_examples_per_task=4"
    " --set eval_examples_per_task=4 --set 'c3po_ngd_steps=[1]' --set 'c3po_ngd_lrs=[30.0]'"
    " --set oracle_steps=1"
)


def _first_unquoted(line: str, chars: str) -> int | None:
    """The index of the first of ``chars`` in ``line`` that is outside quotes and starts a word
    (at the line's start or after a blank), else None."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in chars and (i == 0 or line[i - 1] in " \t"):
            return i
    return None


def _append(extra: str):
    """Add ``extra`` to the command's first program: before a pipe, a redirection or a ``&&``
    outside quotes on its first line (else at its end)."""

    def rewrite(command: str) -> str:
        first_line, newline, rest = command.partition("\n")
        cut = _first_unquoted(first_line, "|>;&")
        if cut is None:
            return first_line + extra + newline + rest
        return first_line[: cut - 1] + extra + first_line[cut - 1 :] + newline + rest

    return rewrite


def _replace(*pairs: tuple[str, str]):
    def rewrite(command: str) -> str:
        for old, new in pairs:
            assert old in command, (old, command)
            command = command.replace(old, new)
        return command

    return rewrite


# regex on the command -> how to shrink it; the first matching rule applies.
SHRINK = (
    (
        r"^moealign train --resume --out runs/tiny_naee3 ",
        _replace(("train.steps=40", "train.steps=6")),
    ),
    (r"^moealign train --config my_text.toml", _append(_TRAIN + " --set model.n_layers=2")),
    (r"moealign(\.cli)? train\b", _append(_TRAIN)),
    (r"^moealign roma ", _append(_ROMA)),
    (r"^moealign eval ", _append(" --eval-batches 1 --task-examples 1")),
    (
        r"^moealign demo\b",
        _append(
            " --seeds 0 1" + _TRAIN + " --set model.n_layers=2 --set model.d_model=32"
            " --set model.n_heads=2 --set model.n_experts=4 --set model.expert_d_ff=32"
        ),
    ),
    (r"^moealign compress ", _append(" --calib-tokens 512")),
    (r"^moealign analyze ", _append(" --max-tokens 512")),
    (
        r"cat > studies/router.toml",
        _replace(("seeds = [0, 1, 2]", "seeds = [0]"), ('"train.steps" = 30', '"train.steps" = 6')),
    ),
    (r"scripts/config_reference.py$", _append(" --check")),
    (r"examples/(megatron|torchtitan)_mpi.py ", _replace(("--steps 60", "--steps 3"))),
    (r"benchmarks/engine_megatron.py ", _replace(("--repeats 3", "--repeats 1"))),
)


@dataclass(frozen=True)
class Command:
    page: str
    line: int  # of the command's first line in the page
    text: str

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def _strip_comment(line: str) -> str:
    """``line`` without a trailing ``# comment`` (a ``#`` outside quotes after a space)."""
    cut = _first_unquoted(line, "#")
    return line.rstrip() if cut is None else line[:cut].rstrip()


def split_commands(block: str, page: str, first_line: int) -> list[Command]:
    """The commands of one bash block: continuation lines joined, a here-document kept with
    its command up to its end marker, a ``for``/``while``/``if`` kept whole; comments and
    blank lines dropped (a here-document's body is kept as written)."""
    lines = block.split("\n")
    commands: list[Command] = []
    i = 0
    while i < len(lines):
        start, text = i, _strip_comment(lines[i])
        i += 1
        if not text:
            continue
        while text.endswith("\\") and i < len(lines):
            text = text[:-1].rstrip() + " " + _strip_comment(lines[i]).lstrip()
            i += 1
        heredoc = re.search(r"<<-?\s*'?(\w+)'?", text)
        if heredoc:
            body = []
            while i < len(lines) and lines[i] != heredoc.group(1):
                body.append(lines[i])
                i += 1
            text = "\n".join([text, *body, heredoc.group(1)])
            i += 1
        opener = re.match(r"(for|while|if)\b", text)
        if opener:
            closer = {"for": "done", "while": "done", "if": "fi"}[opener.group(1)]
            while not re.search(rf"\b{closer}$", text) and i < len(lines):
                text += "\n" + _strip_comment(lines[i])
                i += 1
        commands.append(Command(page, first_line + start, text))
    return commands


def pages() -> list[str]:
    """README.md and every docs/*.md, in :data:`PAGE_ORDER` first."""
    found = ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))
    return [p for p in PAGE_ORDER if p in found] + [p for p in found if p not in PAGE_ORDER]


def documented_commands() -> list[Command]:
    commands = []
    for page in pages():
        text = (ROOT / page).read_text()
        for match in re.finditer(r"^```bash\n(.*?)^```$", text, re.S | re.M):
            first_line = text.count("\n", 0, match.start(1)) + 1
            commands += split_commands(match.group(1), page, first_line)
    return commands


def cannot_run(command: Command) -> str | None:
    for (page, pattern), reason in CANNOT_RUN.items():
        if fnmatch.fnmatch(command.page, page) and re.search(pattern, command.text):
            return reason
    return None


def shrunk(command: Command) -> str:
    first_line, _, rest = command.text.partition("\n")
    for pattern, rewrite in SHRINK:
        if re.search(pattern, first_line):
            text = rewrite(command.text)
            return text
    return command.text


# ---------------------------------------------------------------------- fast checks


def test_readme_starts_with_the_set_up_commands_and_stays_short():
    readme = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    assert [_strip_comment(line) for line in first_block.splitlines()] == list(SETUP_LINES)
    assert readme.startswith("# moealign\n\n```bash\n")
    assert len(readme.splitlines()) <= 200
    own_text = readme.index("## Train on your own text")
    assert len(readme[:own_text].splitlines()) < 40  # on the first screen
    assert 'source = "hf"' in readme and 'paths = ["my_text.txt"]' in readme


def test_splitting_joins_continuations_heredocs_and_loops():
    block = (
        "a --x \\\n    --y 'q # not a comment'   # a comment\n\n"
        "cat > f <<'EOF'\nk = 1   # kept\nEOF\n"
        "for v in 1 2; do\n  echo $v\ndone\n"
    )
    commands = split_commands(block, "p.md", 10)
    assert [c.text for c in commands] == [
        "a --x --y 'q # not a comment'",
        "cat > f <<'EOF'\nk = 1   # kept\nEOF",
        "for v in 1 2; do\n  echo $v\ndone",
    ]
    assert [c.line for c in commands] == [10, 13, 16]
    shrink = _append(" --n 1")
    assert shrink("a --x 'p | q' | b > f") == "a --x 'p | q' --n 1 | b > f"
    assert shrink("a 2>&1") == "a 2>&1 --n 1"
    assert shrink("cat > f <<'EOF'\nx\nEOF") == "cat --n 1 > f <<'EOF'\nx\nEOF"


def test_every_rule_is_used():
    """Each shrink rule and each cannot-run entry matches a documented command (no stale rule)."""
    commands = documented_commands()
    for pattern, _ in SHRINK:
        assert any(re.search(pattern, c.text.partition("\n")[0]) for c in commands), pattern
    for (page, pattern), _ in CANNOT_RUN.items():
        assert any(
            fnmatch.fnmatch(c.page, page) and re.search(pattern, c.text) for c in commands
        ), (page, pattern)


def test_relative_links_resolve():
    """Every relative link of README.md and docs/*.md names a file that exists (or a page
    another branch adds: :data:`PENDING_PAGES`)."""
    for page in pages():
        text = (ROOT / page).read_text()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if re.match(r"\w+://", target):
                continue
            path = ((ROOT / page).parent / target).resolve()
            name = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
            assert path.exists() or name in PENDING_PAGES, f"{page}: broken link {target}"


# ---------------------------------------------------------------------- the commands


def plain_moealign_arguments(script: str) -> list[str] | None:
    """The arguments of a command that is one plain ``moealign ...`` call, else None."""
    if "\n" in script or any(char in script for char in "|&;<>$`()"):
        return None
    words = shlex.split(script)
    return words[1:] if words[0] == "moealign" else None


def _run_in_process(arguments: list[str], folder: Path, env: dict[str, str]) -> tuple[int, str]:
    from moealign.cli import main

    output = io.StringIO()
    saved_env, saved_cwd = os.environ.copy(), os.getcwd()
    try:
        os.environ.update(env)
        os.chdir(folder)
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            code = main(arguments)
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return code, output.getvalue()


def _run_in_bash(script: str, folder: Path, env: dict[str, str]) -> tuple[int, str]:
    result = subprocess.run(
        ["bash", "-c", "set -eo pipefail\n" + script],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
        check=False,
    )
    return result.returncode, result.stdout


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The scratch folder all pages' commands share, and the environment they run in."""
    folder = tmp_path_factory.mktemp("docs")
    for name in ("configs", "scripts", "benchmarks", "examples", "src", "docs"):
        (folder / name).symlink_to(ROOT / name)
    shims = folder / ".bin"
    shims.mkdir()
    moealign = shims / "moealign"
    moealign.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m moealign.cli "$@"\n')
    moealign.chmod(0o755)
    python = shims / "python3"
    python.symlink_to(sys.executable)
    env = {
        **os.environ,
        "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT / "src"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    return folder, env


@pytest.mark.slow
@pytest.mark.parametrize("command", documented_commands(), ids=lambda c: c.id)
def test_documented_command_runs(command, workspace):
    reason = cannot_run(command)
    if reason:
        pytest.skip(reason)
    folder, env = workspace
    script = shrunk(command)
    arguments = plain_moealign_arguments(script)
    if arguments is None:
        code, output = _run_in_bash(script, folder, env)
    else:
        code, output = _run_in_process(arguments, folder, env)
    assert code == 0, f"{command.id} exited {code}\n$ {script}\n{output[-4000:]}"
