"""Loaders for user data (DESIGN.md §7): local text files, JSONL, and ``datasets.load_dataset``.

Every loader returns :class:`~moealign.data.corpus.Document` objects and fails with a
``ValueError`` that names the file and the place (byte offset, line, field) of the problem.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from moealign.data.corpus import Document
from moealign.io import iter_jsonl


def read_utf8_file(path: str | os.PathLike) -> str:
    """The text of ``path``; ValueError if it is missing, empty (or only whitespace), or not
    valid UTF-8 (naming the byte offset of the first bad byte)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path={str(path)!r} does not exist or is not a file")
    data = path.read_bytes()
    if not data.strip():
        raise ValueError(f"file {str(path)!r} is empty; a data file needs text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"file {str(path)!r} is not valid UTF-8: byte 0x{data[error.start]:02x} at byte "
            f"offset {error.start} ({error.reason})"
        ) from None


def load_text_files(paths: Iterable[str | os.PathLike]) -> list[Document]:
    """One document per file, named by its path, in the order given."""
    documents = [Document(name=str(p), text=read_utf8_file(p)) for p in paths]
    if not documents:
        raise ValueError("paths is empty; give at least one text file")
    return documents


def _field_text(record: Any, field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise ValueError(f"{where} is a JSON {type(record).__name__}, not an object")
    if field not in record:
        raise ValueError(f"{where} lacks the field {field!r}; it has {sorted(record)}")
    value = record[field]
    if not isinstance(value, str):
        raise ValueError(f"{where} field {field!r} is a {type(value).__name__}, not a string")
    return value


def load_jsonl(
    path: str | os.PathLike, text_field: str = "text", task_field: str | None = None
) -> list[Document]:
    """One document per non-blank line of a JSON-lines file (read by
    :func:`moealign.io.iter_jsonl`, strictly: a bad last line is an error here too), named
    ``"<path>:<line>"``; the text is ``record[text_field]`` and, when ``task_field`` is given,
    the task label is ``record[task_field]``."""
    documents = []
    for line_number, record in iter_jsonl(path, tolerate_torn_tail=False):
        where = f"{path} line {line_number}"
        documents.append(
            Document(
                name=f"{path}:{line_number}",
                text=_field_text(record, text_field, where),
                task=None if task_field is None else _field_text(record, task_field, where),
            )
        )
    if not documents:
        raise ValueError(f"file {str(path)!r} holds no JSON lines; a data file needs text")
    return documents


class DatasetError(ValueError):
    """A ``datasets`` split that cannot be read; ``part`` names what is at fault: ``dataset``
    (unknown name, missing files, no network), ``split`` (unknown or without rows),
    ``column`` (missing, or not text) or ``max_bytes`` (a first row over the budget)."""

    def __init__(self, part: str, message: str):
        super().__init__(message)
        self.part = part


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def load_hf_dataset(
    path_or_name: str,
    split: str = "train",
    text_field: str = "text",
    task_field: str | None = None,
    *,
    streaming: bool = False,
    max_bytes: int | None = None,
    **kwargs: Any,
) -> list[Document]:
    """Documents from ``datasets.load_dataset(path_or_name, split=split, streaming=streaming,
    **kwargs)``: a hub name for users with network, a local dataset directory, or a packaged
    builder on local files, e.g. ``load_hf_dataset("json", data_files="train.jsonl")``.
    Documents are named ``"<path_or_name>/<split>/<row>"``; with ``max_bytes`` only the longest
    prefix of rows whose UTF-8 text fits the budget is read (a stream stops there).

    Raises :class:`DatasetError` (a ValueError) in one line naming the dataset and split for a
    dataset that cannot be loaded (unknown name, missing files, no network), an unknown split,
    a missing column, a value that is not a string and a split without rows."""
    import datasets  # optional dependency (the "hf" extra)

    from moealign.integrations.locations import pretrained_location

    try:  # a local dataset folder that is not there never goes to the Hub
        path_or_name = pretrained_location(path_or_name, "")
    except ValueError as err:
        raise DatasetError("dataset", str(err)) from None
    where = f"dataset {path_or_name!r} split {split!r}"
    try:
        dataset = datasets.load_dataset(path_or_name, split=split, streaming=streaming, **kwargs)
        rows = iter(dataset)
        first = next(rows, None)
    except Exception as err:  # datasets raises many types; each becomes one line here
        # datasets reports an unknown split as a ValueError naming the split, and a split
        # without a single row as a StopIteration of its schema reader (an empty JSON file) or
        # as a ValueError that the split "corresponds to no data" (a CSV of only its header).
        if isinstance(err, StopIteration) or "corresponds to no data" in str(err):
            raise DatasetError("split", f"{where} is empty: it has no rows") from None
        part = "split" if isinstance(err, ValueError) and "split" in str(err).lower() else None
        raise DatasetError(
            part or "dataset", f"{where} cannot be loaded ({_first_line(err)})"
        ) from None
    if first is None:
        raise DatasetError("split", f"{where} is empty: it has no rows")
    for field in (text_field, task_field):
        if field is not None and field not in first:
            raise DatasetError(
                "column", f"{where} has no column {field!r}; columns: {sorted(first)}"
            )
    documents: list[Document] = []
    total_bytes = 0
    for row, record in enumerate(itertools.chain([first], rows)):
        text = record[text_field]
        if not isinstance(text, str):
            raise DatasetError(
                "column",
                f"{where} row {row} field {text_field!r} is a {type(text).__name__}, not a string",
            )
        size = len(text.encode("utf-8"))
        if max_bytes is not None and total_bytes + size > max_bytes:
            break
        total_bytes += size
        task = None if task_field is None else str(record[task_field])
        documents.append(Document(f"{path_or_name}/{split}/{row}", text, task))
    if not documents:
        raise DatasetError("max_bytes", f"{where}: its first row alone exceeds {max_bytes} bytes")
    return documents
