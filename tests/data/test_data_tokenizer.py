"""Byte and BPE tokenizers: round trips, save/load, on-disk cache (DESIGN.md §7)."""

import pytest
import tokenizers

from moealign.data.corpus import stdlib_documents
from moealign.data.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    build_tokenizer,
    load_tokenizer,
    train_bpe_tokenizer,
)


@pytest.fixture(scope="module")
def texts():
    return [d.text for d in stdlib_documents(max_bytes=200_000)]


def test_byte_tokenizer_round_trip_and_save(tmp_path):
    tok = ByteTokenizer()
    text = "héllo\n\tworld ✓"
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.decode(tok.encode(text) + [tok.eos_id, tok.pad_id]) == text
    assert tok.vocab_size == 258 and {tok.eos_id, tok.pad_id} == {256, 257}
    tok.save(tmp_path / "byte.json")
    assert isinstance(load_tokenizer(tmp_path / "byte.json"), ByteTokenizer)


def test_bpe_round_trips_source_text_and_compresses(tmp_path, texts):
    tok = train_bpe_tokenizer(texts, vocab_size=600, cache_dir=tmp_path)
    assert tok.vocab_size == 600
    held_out = [d.text for d in stdlib_documents(max_documents=40)[-5:]]
    for text in texts[:5] + held_out:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert max(ids) < tok.vocab_size
        assert len(ids) < len(text.encode("utf-8"))
    assert tok.decode(tok.encode("x") + [tok.eos_id, tok.pad_id]) == "x"


def test_bpe_cache_is_reused_and_keyed_by_data_and_size(tmp_path, texts, monkeypatch):
    first = train_bpe_tokenizer(texts, vocab_size=500, cache_dir=tmp_path)
    (path,) = tmp_path.glob("bpe-500-*.json")
    mtime = path.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("the cached tokenizer should have been loaded")

    monkeypatch.setattr(tokenizers.Tokenizer, "train_from_iterator", no_training)
    monkeypatch.setattr(tokenizers.trainers, "BpeTrainer", no_training)
    second = train_bpe_tokenizer(texts, vocab_size=500, cache_dir=tmp_path)
    assert path.stat().st_mtime_ns == mtime
    assert second.encode(texts[0]) == first.encode(texts[0])
    monkeypatch.undo()
    train_bpe_tokenizer(texts[:-1], vocab_size=500, cache_dir=tmp_path)
    train_bpe_tokenizer(texts, vocab_size=520, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("bpe-*.json"))) == 3
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_bpe_save_load_and_build_tokenizer(tmp_path, texts):
    tok = build_tokenizer("bpe", texts=texts, vocab_size=400, cache_dir=tmp_path)
    tok.save(tmp_path / "saved.json")
    loaded = load_tokenizer(tmp_path / "saved.json")
    assert isinstance(loaded, BPETokenizer)
    assert (loaded.eos_id, loaded.pad_id) == (tok.eos_id, tok.pad_id)
    assert loaded.encode(texts[1]) == tok.encode(texts[1])
    assert isinstance(build_tokenizer("byte"), ByteTokenizer)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda d: build_tokenizer("word"), "kind='word'.*'byte', 'bpe'"),
        (lambda d: build_tokenizer("bpe"), "needs texts and cache_dir"),
        (lambda d: train_bpe_tokenizer(["abc"], 100, d), "vocab_size=100"),
        (lambda d: train_bpe_tokenizer([], 300, d), "texts is empty"),
        (lambda d: load_tokenizer(d / "missing.json"), "not a file"),
    ],
)
def test_tokenizer_errors(tmp_path, call, message):
    with pytest.raises(ValueError, match=message):
        call(tmp_path)
