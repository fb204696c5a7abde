"""Progress of a long command, on stderr: the one mechanism every ``moealign`` command uses.

A command is a sequence of *phases* ("load model", "calibrate: batches", "evaluate: tasks"),
each with an optional count of items. On a terminal a phase is a tqdm bar; otherwise (a log
file, a pipe, CI) it is plain lines: ``<phase> (N)`` when it starts, ``<phase>: i/N`` at every
tenth of the way, ``<phase>: done in 1.2 s`` when it ends. ``moealign COMMAND --quiet`` calls
:func:`set_quiet` and nothing of this is printed; :func:`note` lines (a value changed for the
user, e.g. a clamped warm-up) are printed even then. Progress never goes to stdout, which keeps
to results (``--json``: one JSON document). Under ``torchrun`` only rank 0 reports.

    with phase("calibrate", total=len(batches)) as bar:
        for batch in batches:
            ...
            bar.update()
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO, TypeVar

__all__ = ["Phase", "note", "phase", "set_quiet", "track", "write"]

T = TypeVar("T")
# Under torchrun only rank 0 reports (every rank runs the same phases).
_QUIET = int(os.environ.get("RANK", "0")) != 0
_NOTED: set[str] = set()


def set_quiet(quiet: bool) -> None:
    """Silence (True) or show (False, on rank 0) every phase and :func:`write` line of this
    process."""
    global _QUIET
    _QUIET = quiet or int(os.environ.get("RANK", "0")) != 0


def _stream() -> TextIO:
    return sys.stderr


def note(message: str) -> None:
    """One line ``note: <message>`` on stderr, once per process for the same message (a config
    built several times, e.g. by ``demo``, notes a change once). Not silenced by ``--quiet``."""
    if message in _NOTED:
        return
    _NOTED.add(message)
    print(f"note: {message}", file=_stream(), flush=True)


def write(line: str) -> None:
    """A line of progress (e.g. "RoMA done in 3.1 s") that does not break a bar on screen."""
    if _QUIET:
        return
    if _stream().isatty():
        from tqdm.auto import tqdm

        tqdm.write(line, file=_stream())
    else:
        print(line, file=_stream(), flush=True)


class Phase:
    """One phase: ``update(n)`` counts ``n`` more items, ``postfix(loss=...)`` shows values."""

    def __init__(self, label: str, total: int | None, initial: int = 0) -> None:
        self.label, self.total, self.count = label, total, initial
        self.started = time.perf_counter()
        self.enabled = not _QUIET
        self._bar: Any = None
        self._postfix: dict[str, Any] = {}
        self._next_line = self._tenth(initial)
        if not self.enabled:
            return
        if _stream().isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=label, file=_stream())
        else:
            counted = f" ({total})" if total is not None else ""
            print(f"{label}{counted}", file=_stream(), flush=True)

    def _tenth(self, count: int) -> int:
        """The next count at which a plain line is printed: every tenth of ``total``."""
        if not self.total:
            return sys.maxsize
        step = max(1, self.total // 10)
        return (count // step + 1) * step

    def update(self, n: int = 1) -> None:
        self.count += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
        elif self.count >= self._next_line and self.count < (self.total or 0):
            extra = "".join(f" {k}={v}" for k, v in self._postfix.items())
            print(f"{self.label}: {self.count}/{self.total}{extra}", file=_stream(), flush=True)
            self._next_line = self._tenth(self.count)

    def postfix(self, **values: Any) -> None:
        self._postfix = values
        if self.enabled and self._bar is not None:
            self._bar.set_postfix(values, refresh=False)

    def close(self, failed: bool = False) -> None:
        """End the phase: the bar closes; a plain line says ``done`` unless it ``failed`` (the
        error line that follows says why)."""
        if not self.enabled:
            return
        self.enabled = False
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            return
        if failed:
            return
        seconds = time.perf_counter() - self.started
        if self.total is not None:
            counted = f" {self.count}/{self.total}"
        else:  # an unknown count (e.g. batches of a stream): what was counted, if anything
            counted = f" {self.count}" if self.count else ""
        extra = "".join(f" {k}={v}" for k, v in self._postfix.items())
        print(f"{self.label}: done{counted} in {seconds:.1f} s{extra}", file=_stream(), flush=True)


@contextmanager
def phase(label: str, total: int | None = None, initial: int = 0) -> Iterator[Phase]:
    """A :class:`Phase` that closes when the block ends (as failed if it raised)."""
    current = Phase(label, total, initial)
    try:
        yield current
    except BaseException:
        current.close(failed=True)
        raise
    current.close()


def track(items: Iterable[T], label: str, total: int | None = None) -> Iterator[T]:
    """``items``, counted as one phase (``total``: ``len(items)`` where it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with phase(label, total) as current:
        for item in items:
            yield item
            current.update()
