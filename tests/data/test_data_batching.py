"""Batches for the trainer: packing, answer-only labels, task ids, resumable mixed streams."""

import json

import pytest
import torch

from moealign.data.batching import (
    IGNORE_INDEX,
    NO_TASK,
    BatchStream,
    epoch_batches,
    lm_batches,
    lm_sequences,
    mixed_batch_stream,
    pack_lm_blocks,
    task_examples_to_sequences,
)
from moealign.data.tasks import TaskExample, TaskSuiteConfig, build_task_suite, task_id
from moealign.data.tokenizer import ByteTokenizer

TOKENIZER = ByteTokenizer()


def test_pack_lm_blocks_hand_worked():
    blocks = pack_lm_blocks([[1, 2, 3], [4, 5]], seq_len=2, eos_id=0)
    # stream 1 2 3 0 4 5 0 -> two blocks of 3, remainder [0] dropped
    assert blocks.tolist() == [[1, 2, 3], [0, 4, 5]]
    seqs = lm_sequences(blocks)
    assert seqs["input_ids"].tolist() == [[1, 2], [0, 4]]
    assert seqs["labels"].tolist() == [[2, 3], [4, 5]]
    assert seqs["task_ids"].tolist() == [[NO_TASK] * 2] * 2
    assert all(t.dtype == torch.long for t in seqs.values())


def test_task_sequences_label_only_the_answer():
    example = TaskExample("reverse", "reverse: a b =", "b a")
    seqs = task_examples_to_sequences([example], TOKENIZER, 24, task_id)
    tokens = list(b"reverse: a b = b a") + [TOKENIZER.eos_id]
    n_prompt, n = len(b"reverse: a b ="), len(tokens) - 1
    assert seqs["input_ids"][0].tolist() == tokens[:-1] + [TOKENIZER.pad_id] * (24 - n)
    labels = seqs["labels"][0].tolist()
    assert labels == [IGNORE_INDEX] * (n_prompt - 1) + tokens[n_prompt:] + [IGNORE_INDEX] * (24 - n)
    assert TOKENIZER.decode([t for t in labels if t != IGNORE_INDEX]) == " b a"
    assert seqs["task_ids"][0].tolist() == [task_id("reverse")] * n + [NO_TASK] * (24 - n)

    all_labels = task_examples_to_sequences([example], TOKENIZER, 24, task_id, loss_on="all")
    assert all_labels["labels"][0, :n].tolist() == tokens[1:]


def test_task_sequences_on_a_suite_mask_exactly_the_prompts():
    suite = build_task_suite(TaskSuiteConfig(examples_per_task=20, eval_examples_per_task=2))
    seqs = task_examples_to_sequences(suite.train, TOKENIZER, 96, suite.task_id)
    for row, example in enumerate(suite.train):
        labels = seqs["labels"][row]
        answer = [t for t in labels.tolist() if t != IGNORE_INDEX]
        assert answer == list((" " + example.answer).encode()) + [TOKENIZER.eos_id]
        assert set(seqs["task_ids"][row].tolist()) == {suite.task_id(example.task), NO_TASK}


def test_task_sequences_errors():
    example = TaskExample("copy", "copy: a b c =", "a b c")
    with pytest.raises(ValueError, match="needs seq_len >= 19.*got seq_len=10"):
        task_examples_to_sequences([example], TOKENIZER, 10, task_id)
    with pytest.raises(ValueError, match="loss_on='prompt'"):
        task_examples_to_sequences([example], TOKENIZER, 32, task_id, loss_on="prompt")


def _sources():
    text = lm_sequences(torch.arange(13 * 9).view(13, 9))  # 13 blocks, S = 8
    tasks = {k: v + 1000 for k, v in lm_sequences(torch.arange(7 * 9).view(7, 9)).items()}
    return {"text": text, "tasks": tasks}


def test_epoch_batches_cover_each_row_once_and_reshuffle():
    seqs = _sources()["text"]
    epoch0 = list(epoch_batches(seqs, 4, seed=0, epoch=0))
    assert len(epoch0) == 3 and all(b["input_ids"].shape == (4, 8) for b in epoch0)
    rows = torch.cat([b["input_ids"][:, 0] for b in epoch0]) // 9
    assert len(set(rows.tolist())) == 12
    again = list(epoch_batches(seqs, 4, seed=0, epoch=0))
    assert all(torch.equal(a["labels"], b["labels"]) for a, b in zip(epoch0, again, strict=True))
    epoch1 = next(epoch_batches(seqs, 4, seed=0, epoch=1))
    assert not torch.equal(epoch1["input_ids"], epoch0[0]["input_ids"])
    blocks = torch.arange(13 * 9).view(13, 9)
    via_lm = next(lm_batches(blocks, 4, seed=0, epoch=0))
    assert torch.equal(via_lm["labels"], via_lm["input_ids"] + 1)


def test_stream_resumes_bit_for_bit_across_epochs():
    uninterrupted = BatchStream(_sources(), 3, seed=7, weights={"text": 2.0, "tasks": 1.0})
    reference = [next(uninterrupted) for _ in range(25)]
    first = BatchStream(_sources(), 3, seed=7, weights={"text": 2.0, "tasks": 1.0})
    for _ in range(8):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = BatchStream(_sources(), 3, seed=7, weights={"text": 2.0, "tasks": 1.0})
    resumed.load_state_dict(state)
    for expected in reference[8:]:
        batch = next(resumed)
        for key in ("input_ids", "labels", "task_ids"):
            assert torch.equal(batch[key], expected[key])
    assert resumed.state_dict() == uninterrupted.state_dict()
    assert uninterrupted.state_dict()["sources"]["tasks"]["epoch"] >= 2  # crossed epochs


def test_stream_mixes_in_the_given_ratio():
    stream = mixed_batch_stream(*_sources().values(), 2, seed=0, text_to_task_ratio=3.0)
    from_text = [bool((next(stream)["input_ids"] < 1000).all()) for _ in range(40)]
    assert sum(from_text) == 30
    # Every prefix holds the share up to one batch.
    for k in range(1, 41):
        assert abs(sum(from_text[:k]) - 0.75 * k) <= 1


def test_stream_rejects_mismatched_state_and_sources():
    stream = BatchStream(_sources(), 3, seed=1)
    state = stream.state_dict()
    with pytest.raises(ValueError, match="seed=2"):
        BatchStream(_sources(), 3, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="state step=5"):
        stream.load_state_dict({**state, "step": 5})
    with pytest.raises(ValueError, match="batch_size=20"):
        BatchStream(_sources(), 20, seed=1)
    with pytest.raises(ValueError, match="weights names"):
        BatchStream(_sources(), 3, seed=1, weights={"text": 1.0})
