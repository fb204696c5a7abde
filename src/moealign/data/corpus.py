"""A real text corpus on every machine: the running Python's standard library source
(DESIGN.md §7 (b)), with deterministic document-level splits."""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# Directory names left out of the corpus: tests (huge, repetitive, some not UTF-8), installed
# third-party packages and bytecode caches.
EXCLUDED_DIRECTORIES = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)


@dataclass(frozen=True)
class Document:
    """A named text; ``task`` is set when a loader reads a task label alongside the text."""

    name: str
    text: str
    task: str | None = None


def stdlib_documents(
    max_documents: int | None = None, max_bytes: int | None = None
) -> list[Document]:
    """The standard library's ``.py`` files as documents named by their POSIX path relative to
    the stdlib root, in sorted-name order. Empty files and files that are not valid UTF-8 are
    left out. ``max_documents`` keeps the first n; ``max_bytes`` keeps the longest prefix whose
    UTF-8 size stays within the budget."""
    for name, value in (("max_documents", max_documents), ("max_bytes", max_bytes)):
        if value is not None and value < 1:
            raise ValueError(f"{name}={value} must be None or a positive integer")
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = [d for d in subdirectories if d not in EXCLUDED_DIRECTORIES]
        paths += [Path(directory, f) for f in files if f.endswith(".py")]
    paths.sort(key=lambda p: p.relative_to(root).as_posix())
    documents: list[Document] = []
    total_bytes = 0
    for path in paths:
        if max_documents is not None and len(documents) >= max_documents:
            break
        data = path.read_bytes()
        if not data.strip():
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if max_bytes is not None and total_bytes + len(data) > max_bytes:
            break
        total_bytes += len(data)
        documents.append(Document(name=path.relative_to(root).as_posix(), text=text))
    if not documents:
        raise ValueError(
            f"no stdlib documents under {root} fit max_documents={max_documents}, "
            f"max_bytes={max_bytes}"
        )
    return documents


def _unit_interval_hash(name: str, seed: int) -> float:
    digest = hashlib.sha256(f"moealign-split:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_documents(
    documents: Sequence[Document],
    seed: int,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> tuple[list[Document], list[Document], list[Document]]:
    """Document-level (train, val, test) split: a document goes to the bucket its hash
    ``u = sha256(seed, name) / 2^64`` falls in, with bucket edges at the cumulative fractions.
    Disjoint, deterministic, and independent of the input order (each split is sorted by name).
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions={fractions} must be three non-negative numbers that sum to 1")
    names = [d.name for d in documents]
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"documents have duplicate names {duplicates[:5]}; names must be unique")
    edges = (fractions[0], fractions[0] + fractions[1])
    splits: tuple[list[Document], list[Document], list[Document]] = ([], [], [])
    for document in sorted(documents, key=lambda d: d.name):
        u = _unit_interval_hash(document.name, seed)
        splits[0 if u < edges[0] else 1 if u < edges[1] else 2].append(document)
    return splits
