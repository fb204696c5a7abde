"""Loaders for local text, JSONL and `datasets.load_dataset`: content and clear errors."""

import json

import pytest

from moealign.data.batching import pack_lm_blocks
from moealign.data.loaders import load_hf_dataset, load_jsonl, load_text_files
from moealign.data.tokenizer import ByteTokenizer


def test_load_text_files_reads_utf8(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("héllo\n", encoding="utf-8")
    b.write_text("world", encoding="utf-8")
    docs = load_text_files([a, b])
    assert [(d.name, d.text) for d in docs] == [(str(a), "héllo\n"), (str(b), "world")]


def test_text_file_errors_name_file_and_offset(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_text_files([tmp_path / "missing.txt"])
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b" \n")
    with pytest.raises(ValueError, match="empty.txt.*is empty"):
        load_text_files([empty])
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"abc caf\xe9 x")  # 0xe9 is 'e acute' in Latin-1, invalid UTF-8 here
    with pytest.raises(ValueError, match=r"latin1.txt.*0xe9 at byte offset 7"):
        load_text_files([latin1])
    with pytest.raises(ValueError, match="paths is empty"):
        load_text_files([])


def test_load_jsonl_text_and_task(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"text": "one", "task": "a"}, {"text": "two", "task": "b"}]
    path.write_text("\n".join(json.dumps(r) for r in rows[:1]) + "\n\n" + json.dumps(rows[1]))
    docs = load_jsonl(path, task_field="task")
    assert [(d.text, d.task, d.name) for d in docs] == [
        ("one", "a", f"{path}:1"),
        ("two", "b", f"{path}:3"),
    ]


@pytest.mark.parametrize(
    ("content", "kwargs", "message"),
    [
        ('{"text": "ok"}\n{"text": oops}\n', {}, r"bad.jsonl:2: not valid JSON"),
        ('{"text": "ok"}\n{"body": "x"}\n', {}, "line 2 lacks the field 'text'.*body"),
        ('{"text": "ok"}\n', {"task_field": "task"}, "line 1 lacks the field 'task'"),
        ('{"text": 3}\n', {}, "line 1 field 'text' is a int"),
        ("[1, 2]\n", {}, r"bad.jsonl:1: a JSON list"),
    ],
)
def test_bad_jsonl_names_line_and_field(tmp_path, content, kwargs, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_jsonl(path, **kwargs)


def test_load_hf_dataset_from_local_json_and_csv(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"row {i}", "label": i}) for i in range(5)))
    cache = str(tmp_path / "hf_cache")
    docs = load_hf_dataset("json", data_files=str(path), task_field="label", cache_dir=cache)
    assert [d.text for d in docs] == [f"row {i}" for i in range(5)]
    assert [d.task for d in docs] == [str(i) for i in range(5)]
    csv = tmp_path / "train.csv"
    csv.write_text("sentence\nalpha\nbeta\n")
    docs = load_hf_dataset("csv", data_files=str(csv), text_field="sentence", cache_dir=cache)
    assert [d.text for d in docs] == ["alpha", "beta"]
    with pytest.raises(ValueError, match="no column 'text'.*sentence"):
        load_hf_dataset("csv", data_files=str(csv), cache_dir=cache)


def test_text_too_short_for_sequence_length():
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="has 4 tokens.*seq_len \\+ 1 = 9"):
        pack_lm_blocks([tok.encode("abc")], seq_len=8, eos_id=tok.eos_id)
