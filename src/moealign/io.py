"""Files a crash may leave half-written: atomic writes, whole JSONL records, tolerant readers.

* :func:`atomic_write_text` / :func:`atomic_write_json` write a temporary file beside the
  target (``.tmp-<name>-<random>``), flush and fsync it, then ``os.replace`` it into place: a
  reader sees the old file or the new one, never a mix, and a full disk leaves the old file.
* :func:`append_jsonl` appends one record as one ``write`` of the whole line, flushed; a write
  that fails part-way (a full disk) is cut back off, so the file never keeps half a record.
* :func:`read_jsonl` reads a JSON-lines file of objects. A torn *final* line (what a crash or a
  full disk mid-append leaves) is skipped with one warning naming the file and line; a bad line
  anywhere else is corruption and raises :class:`FileFormatError` naming the file and line.
* :func:`read_json` reads a JSON file with one clear error naming the file.
* :func:`remove_temporaries` deletes the ``.tmp-*`` files and folders a killed writer left.

DESIGN.md §8 (run folders); STYLE.md: readers of files a crash may leave half-written tolerate
and report it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "TEMPORARY_PREFIX",
    "FileFormatError",
    "append_jsonl",
    "atomic_write_json",
    "atomic_write_text",
    "iter_jsonl",
    "read_json",
    "read_jsonl",
    "remove_temporaries",
]

log = logging.getLogger(__name__)

TEMPORARY_PREFIX = ".tmp-"
_warned: set[tuple[str, int]] = set()


class FileFormatError(ValueError):
    """A file that is not what it should be (not UTF-8, not JSON, a corrupt JSONL line)."""


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new temporary sibling folder of ``path`` to fill; when the block ends without an
    error it replaces ``path`` (absent or an empty folder) in one rename, else it is removed:
    a reader sees the whole folder or none of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{TEMPORARY_PREFIX}{path.name}-"))
    try:
        yield tmp
        if path.is_dir():
            path.rmdir()  # only an empty folder: rmdir refuses anything else
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` by ``text`` (UTF-8) atomically (creating its folder if needed); on any
    failure ``path`` is unchanged and no temporary file is left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMPORARY_PREFIX}{path.name}-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def atomic_write_json(
    path: str | os.PathLike, data: Any, *, indent: int | None = 2, sort_keys: bool = True
) -> None:
    """:func:`atomic_write_text` of ``data`` as JSON (and a final newline)."""
    atomic_write_text(path, json.dumps(data, indent=indent, sort_keys=sort_keys) + "\n")


def _end_of_last_line(fd: int, size: int) -> int:
    """Offset just after the last newline of the open file (0 if it has none)."""
    end = size
    while end > 0:
        start = max(0, end - 65536)
        os.lseek(fd, start, os.SEEK_SET)
        chunk = os.read(fd, end - start)
        if b"\n" in chunk:
            return start + chunk.rfind(b"\n") + 1
        end = start
    return 0


def _mend_tail(fd: int, path: Path) -> None:
    """Make the file end with a newline before appending: a final line cut short by a crash
    (not valid JSON) is dropped, a complete one only gets its newline, so the next record
    starts on a line of its own and a torn one is never buried mid-file."""
    size = os.fstat(fd).st_size
    if size == 0:
        return
    os.lseek(fd, size - 1, os.SEEK_SET)
    if os.read(fd, 1) == b"\n":
        return
    keep = _end_of_last_line(fd, size)
    os.lseek(fd, keep, os.SEEK_SET)
    try:
        json.loads(os.read(fd, size - keep))
    except (ValueError, RecursionError):
        log.warning("%s: dropping a torn final line (a record cut short by a crash)", path)
        os.ftruncate(fd, keep)
    else:
        os.write(fd, b"\n")


def append_jsonl(path: str | os.PathLike, record: Any) -> None:
    """Append ``record`` as one JSON line in a single ``write`` and flush it to the file.

    If the write fails or is short (a full disk), the file is cut back to its old length and an
    ``OSError`` naming the file is raised: no half record stays behind.
    """
    path = Path(path)
    data = (json.dumps(record) + "\n").encode("utf-8")
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        _mend_tail(fd, path)
        start = os.fstat(fd).st_size
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(28, os.strerror(28))  # a short write: the disk is full
        except OSError as err:
            os.ftruncate(fd, start)
            raise OSError(err.errno, f"cannot append a record: {err.strerror}", str(path)) from None
    finally:
        os.close(fd)


def _decode(path: Path) -> str:
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise FileFormatError(f"{path}: is a directory, not a file") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise FileFormatError(
            f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})"
        ) from None


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in ``path``; :class:`FileFormatError` naming the file if it is not UTF-8
    or not JSON (``FileNotFoundError`` if it is missing)."""
    path = Path(path)
    try:
        return json.loads(_decode(path))
    except (json.JSONDecodeError, RecursionError) as err:
        reason = err.msg if isinstance(err, json.JSONDecodeError) else "nested too deeply"
        raise FileFormatError(f"{path}: not valid JSON ({reason})") from None


def iter_jsonl(
    path: str | os.PathLike, *, tolerate_torn_tail: bool = True
) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of the JSON-lines file ``path``.

    Every line must hold a JSON object. A bad final line is a torn record: skipped with one
    warning (per file and line) when ``tolerate_torn_tail``, else an error like any other bad
    line, which raises :class:`FileFormatError` naming the file and line.
    """
    path = Path(path)
    lines = _decode(path).split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        number = index + 1
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as err:
            if index == last and tolerate_torn_tail:
                if (str(path), number) not in _warned:
                    _warned.add((str(path), number))
                    log.warning(
                        "%s:%d: ignoring a torn final line (a record cut short by a crash)",
                        path,
                        number,
                    )
                return
            reason = err.msg if isinstance(err, json.JSONDecodeError) else "nested too deeply"
            raise FileFormatError(f"{path}:{number}: not valid JSON ({reason})") from None
        if not isinstance(record, dict):
            raise FileFormatError(
                f"{path}:{number}: a JSON {type(record).__name__}; expected an object per line"
            )
        yield number, record


def read_jsonl(path: str | os.PathLike, *, tolerate_torn_tail: bool = True) -> list[dict]:
    """The objects of a JSON-lines file (see :func:`iter_jsonl`); ``[]`` if it does not exist."""
    if not Path(path).exists():
        return []
    return [record for _, record in iter_jsonl(path, tolerate_torn_tail=tolerate_torn_tail)]


def remove_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the ``.tmp-*`` files and folders directly under ``directory`` (left by a writer
    that was killed mid-write); call it only while holding the folder's lock. Returns them."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in directory.iterdir():
        if not entry.name.startswith(TEMPORARY_PREFIX):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    if removed:
        log.info("removed %d stale temporary entries in %s", len(removed), directory)
    return removed
