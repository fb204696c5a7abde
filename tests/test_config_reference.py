"""docs/config_reference.md is generated from the config classes and cannot drift from them."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
import typing
from pathlib import Path

import pytest

from moealign.config import Bounds, ConfigError, RunConfig, bounded, build_config
from moealign.roma.config import RomaConfig

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location(
    "config_reference", ROOT / "scripts" / "config_reference.py"
)
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)


def test_the_committed_page_is_the_generated_one():
    committed = (ROOT / "docs" / "config_reference.md").read_text()
    assert committed == reference.render(), (
        "docs/config_reference.md is out of date: run "
        "PYTHONPATH=src python3 scripts/config_reference.py"
    )


def _sections():
    """(prefix, class) of every table on the page."""
    hints = typing.get_type_hints(RunConfig)
    yield "", RunConfig
    for f in dataclasses.fields(RunConfig):
        if dataclasses.is_dataclass(hints[f.name]):
            yield f"{f.name}.", hints[f.name]
    yield "", RomaConfig


def test_every_key_is_on_the_page_with_its_default():
    page = reference.render()
    for prefix, cls in _sections():
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(typing.get_type_hints(cls)[f.name]):
                continue
            row = re.search(rf"^\| `{re.escape(prefix + f.name)}` \|.*$", page, re.M)
            assert row, prefix + f.name
            default = reference._toml(reference._default(f))
            assert f"| `{default}` |" in row.group(0)


def _beyond(bounds: Bounds, integer: bool) -> list[float]:
    """Values just outside each side of ``bounds`` (the next integer, or the next float)."""

    def below(limit: float) -> float:
        return limit - 1 if integer else math.nextafter(limit, -math.inf)

    def above(limit: float) -> float:
        return limit + 1 if integer else math.nextafter(limit, math.inf)

    return [
        value
        for value in (
            None if bounds.ge is None else below(bounds.ge),
            bounds.gt,
            None if bounds.le is None else above(bounds.le),
            bounds.lt,
        )
        if value is not None
    ]


def test_each_documented_bound_is_the_one_the_config_enforces():
    """For every bounded key, a value just past the bound the page shows is refused with an
    error naming the key, and the bound itself (where inclusive) is the page's number."""
    page = reference.render()
    checked = 0
    for prefix, cls in _sections():
        for f in dataclasses.fields(cls):
            bounds = [b for b in f.metadata.values() if isinstance(b, Bounds)]
            if not bounds:
                continue
            row = re.search(rf"^\| `{re.escape(prefix + f.name)}` \|.*$", page, re.M).group(0)
            default = reference._default(f)
            integer = isinstance(default, int) or typing.get_type_hints(cls)[f.name] in (
                int,
                int | None,
            )
            for bound in bounds:
                for op, limit in (
                    (">=", bound.ge),
                    (">", bound.gt),
                    ("<=", bound.le),
                    ("<", bound.lt),
                ):
                    if limit is not None:
                        assert f"{op} {reference._toml(limit)}" in row, (row, op, limit)
                for value in _beyond(bound, integer):
                    value = [value] * len(default) if isinstance(default, tuple) else value
                    if prefix:
                        data = {prefix.rstrip("."): {f.name: value}}
                    else:
                        data = {f.name: value}
                    with pytest.raises(ConfigError) as error:
                        build_config(cls if cls is RomaConfig else RunConfig, data)
                    assert error.value.field.startswith(prefix + f.name), error.value
                    checked += 1
    assert checked > 60


def test_a_field_without_a_meaning_or_a_meaning_without_a_field_is_an_error():
    @dataclasses.dataclass
    class Undocumented:
        """A section.

        Attributes:
            width: how wide, a line long
                and continued here.
        """

        width: int = bounded(3, ge=1, le=8)
        depth: int = 2

    with pytest.raises(ValueError, match="Undocumented.depth has no line"):
        reference.section_table(Undocumented, "x.")
    assert reference.field_meanings(Undocumented) == {
        "width": "how wide, a line long and continued here."
    }

    @dataclasses.dataclass
    class Stale:
        """A section.

        Attributes:
            gone: a field that no longer exists.
        """

    with pytest.raises(ValueError, match=r"names no field \['gone'\]"):
        reference.section_table(Stale, "")
