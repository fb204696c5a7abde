"""``data.source = "hf"`` (``datasets.load_dataset`` on local json/jsonl/csv/parquet/txt files) and
``data.tokenizer = "hf:PATH"`` (a transformers tokenizer), read through a run config."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

pytest.importorskip("transformers")  # datasets and transformers read the data and tokenizer

import pandas as pd
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from helpers_cli import cli_env
from helpers_train import tiny_config
from moealign.config import ConfigError, load_config
from moealign.data import ByteTokenizer
from moealign.data.build import build_training_data, hf_documents

TEXTS = [f"document {i}: " + " ".join(f"w{(7 * i + j) % 40}" for j in range(30)) for i in range(40)]


def hf_overrides(tmp_path, path, *extra: str) -> list[str]:
    return [
        "data.source=hf",
        f"data.paths=['{path}']",
        "data.text_column=body",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.text_max_bytes=100000",
        *extra,
    ]


def write(tmp_path, kind: str, texts=TEXTS):
    frame = pd.DataFrame({"body": texts, "label": range(len(texts))})
    path = tmp_path / f"data.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in frame.to_dict("records")))
    elif kind == "csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_local_files_of_each_kind_become_the_documents_in_order(tmp_path, kind):
    config = tiny_config(tmp_path, *hf_overrides(tmp_path, write(tmp_path, kind)))
    documents = hf_documents(config.data, "train")
    assert [d.text for d in documents] == TEXTS
    streamed = tiny_config(tmp_path, *hf_overrides(tmp_path, write(tmp_path, kind)))
    streamed.data.hf_streaming = True
    assert hf_documents(streamed.data, "train") == documents


def test_a_text_file_is_read_by_paragraphs(tmp_path):
    """A .txt file's documents are its paragraphs (blank lines between), in order, in the
    column "text"; the document-level split then has documents to split."""
    path = tmp_path / "notes.txt"
    path.write_text("\n\n".join(TEXTS[:3]) + "\n\n\n" + "two\nlines\n")
    overrides = hf_overrides(tmp_path, path)
    overrides.remove("data.text_column=body")
    config = tiny_config(tmp_path, *overrides)
    documents = hf_documents(config.data, "train")
    assert [d.text.strip("\n") for d in documents] == [*TEXTS[:3], "two\nlines"]


def test_training_data_splits_and_byte_budget(tmp_path):
    path = write(tmp_path, "jsonl")
    # Explicit splits: datasets' slice syntax over the one "train" split of local files.
    config = tiny_config(
        tmp_path,
        *hf_overrides(tmp_path, path, "data.hf_split=train[:75%]", "data.hf_val_split=train[75%:]"),
    )
    assert [d.text for d in hf_documents(config.data, "train[:75%]")] == TEXTS[:30]
    data = build_training_data(config)
    tokenizer = ByteTokenizer()
    validation_text = "".join(
        tokenizer.decode(row.tolist()) for batch in data.validation for row in batch["input_ids"]
    )
    assert "document 3" in validation_text and "document 1:" not in validation_text  # 30..39
    # A budget keeps the longest prefix of rows that fits; streaming stops there as well.
    budget = sum(len(t.encode()) for t in TEXTS[:5]) + 3
    for streaming in ("false", "true"):
        small = tiny_config(
            tmp_path,
            *hf_overrides(tmp_path, path, f"data.hf_streaming={streaming}"),
        )
        small.data.text_max_bytes = budget
        assert [d.text for d in hf_documents(small.data, "train")] == TEXTS[:5]


@pytest.mark.parametrize(
    ("setup", "field", "message"),
    [
        (lambda p: ["data.text_column=text"], "data.text_column", "no column 'text'.*'body'"),
        (lambda p: ["data.hf_split=validation"], "data.hf_split", "Unknown split"),
        (lambda p: ["data.hf_val_split=test"], "data.hf_val_split", "Unknown split"),
        (lambda p: [f"data.paths=['{p / 'none.jsonl'}']"], "data.paths", "cannot be loaded"),
        (lambda p: [f"data.paths=['{p / 'empty.csv'}']"], "data.hf_split", "is empty"),
        (lambda p: [f"data.paths=['{p / 'empty.jsonl'}']"], "data.hf_split", "is empty"),
    ],
)
def test_unreadable_data_is_one_error_naming_the_field(tmp_path, setup, field, message):
    path = write(tmp_path, "jsonl")
    (tmp_path / "empty.csv").write_text("body,label\n")
    (tmp_path / "empty.jsonl").write_text("")
    config = tiny_config(tmp_path, *hf_overrides(tmp_path, path), *setup(tmp_path))
    with pytest.raises(ConfigError, match=message) as error:
        build_training_data(config)
    assert error.value.field == field and "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["data.source=hf"], "data.hf_dataset"),  # neither a name nor files
        (["data.source=hf", "data.hf_dataset=x", "data.paths=['a.json']"], "data.hf_dataset"),
        (["data.source=hf", "data.paths=['a.md']"], "data.paths"),
        (["data.source=hf", "data.paths=['a.txt', 'b.jsonl']"], "data.paths"),
        (["data.source=hf", "data.paths=['a.csv', 'b.json']"], "data.paths"),
        (["data.source=hf", "data.hf_dataset=x", "data.text_column= "], "data.text_column"),
        (["data.tokenizer=word"], "data.tokenizer"),
        (["data.tokenizer=hf:"], "data.tokenizer"),
    ],
)
def test_bad_hf_settings_fail_at_config_load(overrides, field):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert error.value.field == field


def save_word_tokenizer(directory) -> PreTrainedTokenizerFast:
    """A word-level transformers tokenizer over w0..w39 and 'document', with EOS and PAD."""
    vocab = {"[UNK]": 0, "</s>": 1, "<pad>": 2, "document": 3, ":": 4}
    vocab |= {str(i): 5 + i for i in range(40)} | {f"w{i}": 45 + i for i in range(40)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.save_pretrained(directory)
    return tokenizer


@pytest.mark.slow
def test_training_on_hf_data_with_an_hf_tokenizer(tmp_path):
    from moealign.training.trainer import Trainer

    hf_tokenizer = save_word_tokenizer(tmp_path / "tok")
    overrides = hf_overrides(
        tmp_path, write(tmp_path, "parquet"), f"data.tokenizer=hf:{tmp_path / 'tok'}"
    )
    config = tiny_config(tmp_path, *overrides, "name=hf", "train.steps=2", "train.seq_len=16")
    assert config.model.vocab_size == len(hf_tokenizer) == 85  # taken from the tokenizer
    data = build_training_data(config)
    assert (data.tokenizer.eos_id, data.tokenizer.pad_id) == (1, 2)
    first = data.validation[0]["input_ids"][0].tolist()
    words = " ".join(TEXTS)
    assert " ".join(hf_tokenizer.convert_ids_to_tokens(first)) in words.replace(":", " :")
    trainer = Trainer(config, progress=False)
    trainer.train()
    trainer.close()
    recorded = json.loads((config.run_dir / "config.json").read_text())
    assert recorded["model"]["vocab_size"] == 85
    saved = AutoTokenizer.from_pretrained(config.run_dir / "tokenizer")
    assert saved.encode(TEXTS[0]) == hf_tokenizer.encode(TEXTS[0])
    with pytest.raises(ConfigError, match="data.tokenizer: no Hugging Face tokenizer"):
        tiny_config(tmp_path, f"data.tokenizer=hf:{tmp_path / 'missing'}")


@pytest.mark.slow
def test_cli_reports_an_unknown_dataset_name_offline(tmp_path):
    overrides = ["data.source=hf", "data.hf_dataset=no-such-dataset", f"data.cache_dir={tmp_path}"]
    result = subprocess.run(
        [sys.executable, "-m", "moealign.cli", "train", "--out", str(tmp_path / "run")]
        + [argument for override in overrides for argument in ("--set", override)],
        cwd=tmp_path,
        env=cli_env() | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    # The progress ("train: build the data"), then one error line, the last.
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [result.stderr.strip().splitlines()[-1]]
    assert errors[0].startswith("error: data.hf_dataset: dataset 'no-such-dataset'")
