"""Tokenizers saved as Hugging Face files load in ``transformers.AutoTokenizer`` with the same
ids (a real outside client: transformers' own loader, nothing mocked)."""

import json

import pytest
from tokenizers import pre_tokenizers

pytest.importorskip("transformers")  # its AutoTokenizer is the client under test

from transformers import AutoTokenizer

from moealign.data.batching import ANSWER_SEPARATOR
from moealign.data.corpus import stdlib_documents
from moealign.data.tasks import TaskSuiteConfig, build_task_suite, multiple_choice_view
from moealign.data.tokenizer import (
    EOS_TOKEN,
    PAD_TOKEN,
    ByteTokenizer,
    byte_level_tokenizer,
    train_bpe_tokenizer,
)

# Every code point U+0000..U+00FF (UTF-8 bytes 0x00-0x7F, 0xC2/0xC3 + 0x80-0xBF), then 2-, 3-
# and 4-byte characters (leading bytes 0xC4-0xF0), whitespace runs and lookalikes of tokens.
EVERY_BYTE_TEXT = (
    "".join(map(chr, range(256)))
    + "ĀſƀɏЖ߿ࠀ日本語✓\uffff\U00010000🙂\U0010ffff"
    + "  two  spaces\r\n\t<0x41> <|endoftext "
    + "x" * 40
)


def suite_texts() -> list[str]:
    """Every prompt and answer continuation of the task suite (plain and multiple choice)."""
    suite = build_task_suite(
        TaskSuiteConfig(examples_per_task=7, eval_examples_per_task=3, heldout_compositions=())
    )
    examples = suite.train + suite.test + suite.heldout_tasks + suite.long_lengths
    examples += multiple_choice_view(examples, n_options=4, seed=0)
    return [text for e in examples for text in (e.prompt, ANSWER_SEPARATOR + e.answer)]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    texts = [d.text for d in stdlib_documents(max_bytes=100_000)]
    return train_bpe_tokenizer(texts, vocab_size=400, cache_dir=tmp_path_factory.mktemp("bpe"))


def test_byte_level_alphabet_is_the_pre_tokenizers_own():
    tokenizer = byte_level_tokenizer()
    alphabet = {tokenizer.id_to_token(b) for b in range(256)}
    assert alphabet == set(pre_tokenizers.ByteLevel.alphabet())
    assert tokenizer.get_vocab_size() == 258


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_auto_tokenizer_gives_moealign_ids(kind, bpe, tmp_path):
    tokenizer = ByteTokenizer() if kind == "byte" else bpe
    tokenizer.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert len(hf) == tokenizer.vocab_size
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == (EOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (
        tokenizer.eos_id,
        tokenizer.eos_id,
        tokenizer.pad_id,
    )
    texts = [EVERY_BYTE_TEXT, *suite_texts()]
    for text in texts:
        ids = tokenizer.encode(text)
        assert hf(text)["input_ids"] == ids  # no BOS/EOS added by default
        assert hf.encode(text, add_special_tokens=False) == ids
        assert hf.decode(ids) == tokenizer.decode(ids) == text
    batch = hf(texts[:8])["input_ids"]
    assert batch == [tokenizer.encode(text) for text in texts[:8]]
    if kind == "byte":  # every id decodes as moealign decodes it, invalid UTF-8 included
        for start in range(0, 256, 3):
            ids = list(range(start, min(start + 3, 256)))
            assert hf.decode(ids) == tokenizer.decode(ids)
    # A literal special token: bytes for the byte tokenizer, the special id for BPE.
    literal = f"a{EOS_TOKEN}b"
    assert hf.encode(literal) == tokenizer.encode(literal)
    assert hf.decode(tokenizer.encode("ok") + [tokenizer.eos_id], skip_special_tokens=True) == "ok"


def test_hf_files_are_rewritten_in_place(tmp_path):
    ByteTokenizer().save_pretrained(tmp_path)
    ByteTokenizer().save_pretrained(tmp_path)  # a resumed run saves again
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["split_special_tokens"] is True
    assert not list(tmp_path.glob(".*tmp"))
