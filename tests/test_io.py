"""moealign.io: atomic writes, whole JSONL records, a reader that tolerates only a torn tail."""

from __future__ import annotations

import errno
import json
import logging
import os

import pytest

from moealign import io
from moealign.io import (
    FileFormatError,
    append_jsonl,
    atomic_directory,
    atomic_write_json,
    atomic_write_text,
    iter_jsonl,
    read_json,
    read_jsonl,
    remove_temporaries,
)


def test_atomic_write_replaces_and_a_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "sub" / "a.json"
    atomic_write_json(path, {"b": 1, "a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1}
    assert path.read_text().endswith("\n")
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(path, "\ud800 cannot be encoded")
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1}
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]  # no temporary left


def test_atomic_write_on_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io.os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_append_writes_whole_lines_and_mends_a_torn_tail(tmp_path, caplog):
    path = tmp_path / "m.jsonl"
    append_jsonl(path, {"step": 1})
    path.write_bytes(path.read_bytes() + b'{"step": 2, "lo')  # a crash mid-append
    with caplog.at_level(logging.WARNING, logger="moealign.io"):
        append_jsonl(path, {"step": 3})
    assert read_jsonl(path, tolerate_torn_tail=False) == [{"step": 1}, {"step": 3}]
    assert "torn final line" in caplog.text and "m.jsonl" in caplog.text
    # A complete last record that only lacks its newline is kept.
    path.write_text('{"step": 1}')
    append_jsonl(path, {"step": 2})
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


@pytest.mark.parametrize("written", [0, 5])
def test_append_on_a_full_disk_leaves_no_half_record(tmp_path, monkeypatch, written):
    path = tmp_path / "m.jsonl"
    append_jsonl(path, {"step": 1})
    before = path.read_bytes()
    real_write = os.write

    def full(fd, data):
        if written:  # a short write: part of the record reached the disk
            real_write(fd, data[:written])
            return written
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io.os, "write", full)
    with pytest.raises(OSError, match="m.jsonl") as caught:
        append_jsonl(path, {"step": 2, "loss": 1.5})
    assert caught.value.errno == errno.ENOSPC
    assert path.read_bytes() == before


def test_reader_skips_a_torn_final_line_once_with_a_warning(tmp_path, caplog):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n\n{"step": 2}\n{"step": 3, "lo')
    with caplog.at_level(logging.WARNING, logger="moealign.io"):
        assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
        assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and f"{path}:4" in warnings[0]
    with pytest.raises(FileFormatError, match=r"m\.jsonl:4: not valid JSON"):
        read_jsonl(path, tolerate_torn_tail=False)
    assert [number for number, _ in iter_jsonl(path)] == [1, 3]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"step": 1}\n{oops\n{"step": 3}\n', r"m\.jsonl:2: not valid JSON"),
        (b'{"step": 1}\n[1, 2]\n', r"m\.jsonl:2: a JSON list; expected an object"),
        (b'{"name": "caf\xe9"}\n', r"m\.jsonl: not UTF-8 text \(byte 0xe9 at offset 13\)"),
        (b"[" * 100_000 + b"\n{}\n", r"m\.jsonl:1: not valid JSON \(nested too deeply\)"),
    ],
)
def test_reader_rejects_corruption_before_the_last_line(tmp_path, content, message):
    path = tmp_path / "m.jsonl"
    path.write_bytes(content)
    with pytest.raises(FileFormatError, match=message):
        read_jsonl(path)


def test_read_json_names_the_file(tmp_path):
    assert read_jsonl(tmp_path / "missing.jsonl") == []
    path = tmp_path / "c.json"
    path.write_text('{"a": ')
    with pytest.raises(FileFormatError, match=r"c\.json: not valid JSON"):
        read_json(path)
    with pytest.raises(FileFormatError, match="is a directory"):
        read_json(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_json(tmp_path / "missing.json")


def test_remove_temporaries_only_touches_tmp_entries(tmp_path):
    (tmp_path / ".tmp-step_000001-123").mkdir()
    (tmp_path / ".tmp-step_000001-123" / "model.safetensors").write_text("x")
    (tmp_path / ".tmp-meta.json-abc").write_text("x")
    (tmp_path / "step_000001").mkdir()
    (tmp_path / "tmp-keep").write_text("x")
    removed = remove_temporaries(tmp_path)
    assert len(removed) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001", "tmp-keep"]


def test_atomic_directory_publishes_the_whole_folder_or_nothing(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(RuntimeError), atomic_directory(out) as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError("killed mid-write")
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no temporary left behind
    out.mkdir()  # an empty folder is replaced
    with atomic_directory(out) as tmp:
        (tmp / "weights").write_text("whole")
        assert not (out / "weights").exists()  # nothing visible before the block ends
    assert (out / "weights").read_text() == "whole"
    with pytest.raises(OSError), atomic_directory(out) as tmp:  # a non-empty folder is kept
        (tmp / "weights").write_text("other")
    assert (out / "weights").read_text() == "whole" and sorted(tmp_path.iterdir()) == [out]
