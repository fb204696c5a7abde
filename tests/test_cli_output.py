"""What the command line prints around the work: defaults in every --help, quiet logging."""

from __future__ import annotations

import argparse
import logging

import pytest

from moealign.cli import COMMANDS, build_parser, configure_logging


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _has_default(action: argparse.Action) -> bool:
    default = action.default
    return not (
        default is None
        or default is False
        or default == []
        or default == argparse.SUPPRESS
        or action.help is None
    )


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_help_shows_the_defaults(name):
    sub = _subparsers(build_parser())[name]
    text = " ".join(sub.format_help().split())  # lines rejoined where help wrapped them
    with_defaults = [a for a in sub._actions if _has_default(a) and a.option_strings]
    for action in with_defaults:
        assert f"(default: {action.default})" in text or "default" in action.help, action.dest
    # Options without a default to show get no "(default: None)".
    assert "(default: None)" not in text and "(default: False)" not in text


def test_help_of_analyze_names_its_defaults():
    text = " ".join(_subparsers(build_parser())["analyze"].format_help().split())
    for fragment in ("(default: 256)", "(default: 8)", "(default: 100000)", "(default: text)"):
        assert fragment in text


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    levels = {name: logging.getLogger(name).level for name in ("moealign", "absl")}
    level = root.level
    yield
    root.setLevel(level)
    for name, value in levels.items():
        logging.getLogger(name).setLevel(value)


def test_other_libraries_log_from_warning_unless_verbose(restore_logging):
    configure_logging(verbose=False)
    assert not logging.getLogger("matplotlib.category").isEnabledFor(logging.INFO)
    assert logging.getLogger("transformers.x").isEnabledFor(logging.WARNING)
    assert logging.getLogger("moealign.training.trainer").isEnabledFor(logging.INFO)
    configure_logging(verbose=True)
    assert logging.getLogger("matplotlib.category").isEnabledFor(logging.INFO)
    assert not logging.getLogger("absl").isEnabledFor(logging.INFO)
    assert build_parser().parse_args(["compare", "a", "b", "--verbose"]).verbose
