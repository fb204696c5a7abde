"""Loaders for user data (DESIGN.md §7): local text files, JSONL, and ``datasets.load_dataset``.

Every loader returns :class:`~moealign.data.corpus.Document` objects and fails with a
``ValueError`` that names the file and the place (byte offset, line, field) of the problem.
"""

from __future__ import annotations

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


def load_hf_dataset(
    path_or_name: str,
    split: str = "train",
    text_field: str = "text",
    task_field: str | None = None,
    **kwargs: Any,
) -> list[Document]:
    """Documents from ``datasets.load_dataset(path_or_name, split=split, **kwargs)``: a hub name
    for users with network, or a packaged builder on local files, e.g.
    ``load_hf_dataset("json", data_files="train.jsonl")``. Documents are named
    ``"<path_or_name>/<split>/<row>"``."""
    import datasets  # optional dependency (the "hf" extra)

    dataset = datasets.load_dataset(path_or_name, split=split, **kwargs)
    for field in (text_field, task_field):
        if field is not None and field not in dataset.column_names:
            raise ValueError(
                f"dataset {path_or_name!r} split {split!r} has no column {field!r}; "
                f"columns: {dataset.column_names}"
            )
    texts = dataset[text_field]
    tasks = dataset[task_field] if task_field is not None else [None] * len(texts)
    documents = []
    for row, (text, task) in enumerate(zip(texts, tasks, strict=True)):
        if not isinstance(text, str):
            raise ValueError(
                f"dataset {path_or_name!r} row {row} field {text_field!r} is a "
                f"{type(text).__name__}, not a string"
            )
        documents.append(
            Document(f"{path_or_name}/{split}/{row}", text, None if task is None else str(task))
        )
    return documents
