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
* :func:`read_bytes` is the one reader of user and run files: it opens only regular files
  (a FIFO or ``/dev/zero`` is refused at once, never read), refuses a file larger than its
  limit, and names the file; :func:`check_depth` refuses values nested deeper than
  :data:`MAX_DEPTH` (JSON, TOML and ``--set`` values alike).
* :func:`temporary_name` names a temporary sibling ``.tmp-<pid>-<name>``, cut so that it (and
  a random suffix) fits the 255 bytes of a file name; :func:`remove_temporaries` deletes the
  ones whose writer process is dead (a kill -9 mid-write), never a live writer's.

DESIGN.md §8 (run folders); STYLE.md: readers of files a crash may leave half-written tolerate
and report it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "MAX_DEPTH",
    "MAX_FILE_BYTES",
    "TEMPORARY_PREFIX",
    "FileFormatError",
    "append_jsonl",
    "atomic_write_json",
    "atomic_write_text",
    "check_depth",
    "iter_jsonl",
    "naming_file",
    "pid_alive",
    "read_bytes",
    "read_json",
    "read_jsonl",
    "remove_temporaries",
    "temporary_name",
]

log = logging.getLogger(__name__)

TEMPORARY_PREFIX = ".tmp-"
_TEMPORARY = re.compile(r"^\.tmp-(\d+)-")  # .tmp-<pid>-...: the writer's pid
_NAME_BYTES = 255  # the longest file name Linux, macOS and Windows file systems accept
_RANDOM_SUFFIX = 9  # "-" and the 8 random characters tempfile adds
MAX_FILE_BYTES = 256 * 2**20  # the largest config, record or metrics file read (256 MiB)
MAX_DEPTH = 64  # the deepest nesting of tables/arrays accepted in a config or record
_warned: set[tuple[str, int]] = set()


class FileFormatError(ValueError):
    """A file that is not what it should be (not UTF-8, not JSON, a corrupt JSONL line)."""


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (signal 0: no signal is sent)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # exists but belongs to another user (or cannot be a pid: keep it)
    return True


def temporary_name(name: str) -> str:
    """``.tmp-<pid>-<name>``, with ``name`` cut (on a character boundary) so that the result
    plus a random suffix fits in 255 bytes: a legal 255-byte target keeps a legal sibling."""
    prefix = f"{TEMPORARY_PREFIX}{os.getpid()}-"
    room = _NAME_BYTES - len(prefix) - _RANDOM_SUFFIX
    encoded = os.fsencode(name)
    if len(encoded) > room:  # cut, and drop a character split by the cut
        encoded = encoded[:room].decode("utf-8", "ignore").encode("utf-8")
    return prefix + os.fsdecode(encoded)


def read_bytes(path: str | os.PathLike, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of the regular file ``path``; :class:`FileFormatError` naming it if it is a
    folder, a FIFO, a device or a socket (opened without blocking, never read) or larger than
    ``limit`` bytes (``FileNotFoundError``/``PermissionError`` as ``open`` raises them)."""
    path = Path(path)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise FileFormatError(f"{path}: is a directory, not a file")
        if not stat.S_ISREG(info.st_mode):
            raise FileFormatError(
                f"{path}: not a regular file (a FIFO, device or socket); expected a file"
            )
        if info.st_size > limit:
            raise FileFormatError(
                f"{path}: {info.st_size:,} bytes, larger than the {limit:,} accepted"
            )
        chunks, size = [], 0
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:  # grew while being read
                raise FileFormatError(f"{path}: larger than the {limit:,} bytes accepted")
        return b"".join(chunks)
    finally:
        os.close(fd)


@contextlib.contextmanager
def naming_file(what: str, path: str | os.PathLike) -> Iterator[None]:
    """Within the block, any failure of a third-party loader (transformers, tokenizers,
    safetensors: each with its own error types and messages that name no file) becomes one
    :class:`FileFormatError` naming ``what`` and ``path`` with the loader's first line."""
    try:
        yield
    except FileFormatError:
        raise
    except Exception as err:
        lines = str(err).strip().splitlines()
        reason = " ".join(lines[0].split())[:300] if lines else type(err).__name__
        raise FileFormatError(f"{what} {str(path)!r} cannot be loaded: {reason}") from None


def check_depth(value: Any, where: str, limit: int = MAX_DEPTH) -> Any:
    """``value`` if its tables/arrays nest at most ``limit`` deep, else
    :class:`FileFormatError` naming ``where`` (checked without recursion)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, (list, tuple)):
            children = node
        else:
            continue
        if depth > limit:
            raise FileFormatError(f"{where}: nested more than {limit} levels deep")
        stack.extend((child, depth + 1) for child in children)
    return value


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
    remove_temporaries(path.parent, without_pid=False)  # what a killed writer left beside it
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=temporary_name(path.name) + "-"))
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
    remove_temporaries(path.parent, without_pid=False)  # what a killed writer left beside it
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temporary_name(path.name) + "-")
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
    data = read_bytes(path)
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
        return check_depth(json.loads(_decode(path)), str(path))
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
        yield number, check_depth(record, f"{path}:{number}")


def read_jsonl(path: str | os.PathLike, *, tolerate_torn_tail: bool = True) -> list[dict]:
    """The objects of a JSON-lines file (see :func:`iter_jsonl`); ``[]`` if it does not exist."""
    if not Path(path).exists():
        return []
    return [record for _, record in iter_jsonl(path, tolerate_torn_tail=tolerate_torn_tail)]


def remove_temporaries(directory: str | os.PathLike, *, without_pid: bool = True) -> list[Path]:
    """Delete the ``.tmp-<pid>-*`` files and folders directly under ``directory`` whose writer
    process is dead (killed mid-write), and with ``without_pid`` the older ``.tmp-*`` entries
    that name no pid (only while holding the folder's lock). A live writer's temporaries stay.
    Returns the removed entries."""
    directory = Path(directory)
    if not directory.is_dir() or directory.is_symlink():
        return []
    removed = []
    for entry in directory.iterdir():
        if not entry.name.startswith(TEMPORARY_PREFIX):
            continue
        match = _TEMPORARY.match(entry.name)
        if not match and not without_pid:
            continue
        if match and (int(match.group(1)) == os.getpid() or pid_alive(int(match.group(1)))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    if removed:
        log.info("removed %d stale temporary entries in %s", len(removed), directory)
    return removed
