"""Build the trainer's data from a :class:`~moealign.config.DataConfig` (DESIGN.md §7).

Sources: ``tasks`` (the synthetic multi-task suite), ``text`` (the Python standard library's
sources, packed into blocks), ``mixed`` (both, ``text_to_task_ratio`` text batches per task
batch), ``files`` (local ``.txt`` files, or ``.jsonl`` files with a ``text`` field) and ``hf``
(a text column read with ``datasets.load_dataset``: :func:`hf_documents`); task
examples are plain or in their multiple-choice view (``data.format``). The
training stream is a resumable :class:`moealign.data.BatchStream` over the train splits; the
validation batches are the first ``train.eval_batches`` batches of a stream over the
validation splits with the same mixture.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moealign.config import ConfigError, DataConfig, RunConfig
from moealign.data import (
    BatchStream,
    DatasetError,
    Document,
    TaskExample,
    TaskSuite,
    TaskSuiteConfig,
    Tokenizer,
    build_task_suite,
    build_tokenizer,
    lm_sequences,
    load_hf_dataset,
    load_jsonl,
    load_text_files,
    multiple_choice_view,
    pack_lm_blocks,
    split_documents,
    stdlib_documents,
    task_examples_to_sequences,
    task_id,
)

__all__ = [
    "TrainingData",
    "build_data_suite",
    "build_data_tokenizer",
    "build_training_data",
    "formatted_examples",
    "hf_documents",
]

Sequences = dict[str, torch.Tensor]


@dataclass
class TrainingData:
    """The training stream (global batches of ``train.batch_size`` sequences), the fixed list of
    validation batches, the tokenizer that produced them and, when the data holds the synthetic
    tasks, their suite (for the final task evaluation)."""

    train: BatchStream
    validation: list[Sequences]
    tokenizer: Tokenizer
    suite: TaskSuite | None = None


def hf_documents(data: DataConfig, split: str) -> list[Document]:
    """The ``data.text_column`` documents of ``split`` of the ``datasets`` data that ``data``
    names (``source = "hf"``), up to ``text_max_bytes``; ConfigError naming the field at
    fault (the dataset, the split, the column) for data that cannot be read."""
    options = {"cache_dir": str(Path(data.cache_dir) / "datasets")}
    if data.paths:
        options["data_files"] = list(data.paths)
    if data.hf_config:
        options["name"] = data.hf_config
    if data.hf_builder == "text":  # plain text files: one document per paragraph
        options["sample_by"] = "paragraph"
    try:
        return load_hf_dataset(
            data.hf_builder,
            split=split,
            text_field=data.text_column,
            streaming=data.hf_streaming,
            max_bytes=data.text_max_bytes,
            **options,
        )
    except DatasetError as err:
        field = {
            "dataset": "paths" if data.paths else "hf_dataset",
            "split": "hf_split" if split == data.hf_split else "hf_val_split",
            "column": "text_column",
            "max_bytes": "text_max_bytes",
        }[err.part]
        raise ConfigError(f"data.{field}", str(err)) from None


def _documents(data: DataConfig) -> list[Document]:
    if data.source == "hf":
        return hf_documents(data, data.hf_split)
    if data.source == "files":
        documents: list[Document] = []
        for path in data.paths:
            if Path(path).suffix == ".jsonl":
                documents += load_jsonl(path)
            else:
                documents += load_text_files([path])
        return documents
    return stdlib_documents(max_bytes=data.text_max_bytes)


def _text_splits(
    config: RunConfig, tokenizer: Tokenizer, documents: list[Document]
) -> tuple[Sequences, Sequences]:
    data = config.data
    if data.source == "hf" and data.hf_val_split:
        train_docs, val_docs = documents, hf_documents(data, data.hf_val_split)
    else:
        train_docs, val_docs, _ = split_documents(documents, seed=data.seed)
    if not train_docs or not val_docs:
        raise ConfigError(
            "data",
            f"the text has {len(documents)} documents, too few for a train and a validation "
            "split; give more text (data.text_max_bytes, data.paths)",
        )
    return tuple(  # type: ignore[return-value]
        lm_sequences(
            pack_lm_blocks(
                [tokenizer.encode(d.text) for d in docs], config.train.seq_len, tokenizer.eos_id
            )
        )
        for docs in (train_docs, val_docs)
    )


def build_data_suite(data: DataConfig) -> TaskSuite:
    """The task suite that ``data`` describes (seed, size, tasks, held-out sets), in its plain
    form; :func:`formatted_examples` gives the form the model is trained on."""
    heldout = {
        name: value
        for name in ("heldout_tasks", "heldout_compositions")
        if (value := getattr(data, name)) is not None
    }
    return build_task_suite(
        TaskSuiteConfig(
            seed=data.seed,
            examples_per_task=data.examples_per_task,
            tasks=data.tasks,
            **heldout,
        )
    )


def formatted_examples(data: DataConfig, examples: list[TaskExample]) -> list[TaskExample]:
    """``examples`` in ``data.format``: unchanged (``plain``) or their multiple-choice view with
    ``data.n_options`` options seeded by ``data.seed``."""
    if data.format == "multiple_choice":
        return multiple_choice_view(examples, data.n_options, seed=data.seed)
    return examples


def _task_splits(
    config: RunConfig, tokenizer: Tokenizer, suite: TaskSuite
) -> tuple[Sequences, Sequences]:
    data = config.data
    return tuple(  # type: ignore[return-value]
        task_examples_to_sequences(
            formatted_examples(data, examples),
            tokenizer,
            config.train.seq_len,
            task_id,
            loss_on=data.loss_on,
        )
        for examples in (suite.train, suite.val)
    )


def build_data_tokenizer(data: DataConfig, documents: list[Document] | None = None) -> Tokenizer:
    """The tokenizer ``data`` trains with (a BPE one is trained on, or loaded from the cache
    for, the text ``documents``; None = read them as :func:`build_training_data` does)."""
    if documents is None and data.tokenizer == "bpe":
        documents = _documents(data) if data.source != "tasks" else []
    return build_tokenizer(
        data.tokenizer,
        texts=[d.text for d in documents] if data.tokenizer == "bpe" else None,
        vocab_size=data.vocab_size,
        cache_dir=data.cache_dir,
    )


def build_training_data(config: RunConfig) -> TrainingData:
    """Tokenizer, training stream and validation batches for ``config``.

    Raises :class:`ConfigError` if the tokenizer's vocabulary does not fit
    ``model.vocab_size`` or the data cannot be built with these settings.
    """
    data = config.data
    try:
        documents = _documents(data) if data.source != "tasks" else []
        tokenizer = build_data_tokenizer(data, documents)
        if tokenizer.vocab_size > config.model.vocab_size:
            raise ConfigError(
                "model.vocab_size",
                f"got {config.model.vocab_size}; expected >= the tokenizer's vocabulary size "
                f"{tokenizer.vocab_size} (data.tokenizer={data.tokenizer!r})",
            )
        train: dict[str, Sequences] = {}
        val: dict[str, Sequences] = {}
        if data.source in ("text", "mixed", "files", "hf"):
            train["text"], val["text"] = _text_splits(config, tokenizer, documents)
        suite = None
        if data.source in ("tasks", "mixed"):
            task_suite = build_data_suite(config.data)
            train["tasks"], val["tasks"] = _task_splits(config, tokenizer, task_suite)
            # The end-of-run answer generation scores plain prompts; a multiple-choice run is
            # scored by option likelihood instead
            # (moealign.evaluation.multiple_choice.score_multiple_choice).
            suite = task_suite if data.format == "plain" else None
        weights = {"text": data.text_to_task_ratio, "tasks": 1.0}
        weights = {name: weights[name] for name in train}
        batch_size = config.train.batch_size
        stream = BatchStream(train, batch_size, seed=data.seed, weights=weights)
        val_size = min(batch_size, *(s["input_ids"].shape[0] for s in val.values()))
        val_stream = BatchStream(val, val_size, seed=data.seed, weights=weights)
        validation = [next(val_stream) for _ in range(config.train.eval_batches)]
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError("data", str(err)) from None
    return TrainingData(train=stream, validation=validation, tokenizer=tokenizer, suite=suite)
