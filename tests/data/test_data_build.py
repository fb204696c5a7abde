"""``data.format = "multiple_choice"``: the trainer's task rows are the multiple-choice view."""

from __future__ import annotations

from moealign.config import load_config
from moealign.data import IGNORE_INDEX, TaskSuiteConfig, build_task_suite, multiple_choice_view
from moealign.data.build import build_training_data

OVERRIDES = [
    "data.source=tasks",
    "data.examples_per_task=20",
    "data.tasks=['addition', 'max', 'brackets', 'min']",
    "data.heldout_tasks=['min']",
    "data.heldout_compositions=[]",
    "data.seed=3",
    "model.vocab_size=258",
    "model.max_seq_len=96",
    "train.seq_len=80",
    "train.batch_size=40",
]


def _rows(config):
    data = build_training_data(config)
    batch = next(data.train)
    rows = []
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True):
        answer_start = next(s for s, label in enumerate(labels) if label != IGNORE_INDEX)
        prompt = data.tokenizer.decode(ids[: answer_start + 1])
        answer = data.tokenizer.decode([t for t in labels if t != IGNORE_INDEX][:-1])
        rows.append((prompt, answer))
    return rows


def test_multiple_choice_format_trains_on_the_multiple_choice_view():
    config = load_config(None, [*OVERRIDES, "data.format=multiple_choice", "data.n_options=3"])
    suite = build_task_suite(
        TaskSuiteConfig(
            seed=3,
            examples_per_task=20,
            tasks=("addition", "max", "brackets", "min"),
            heldout_tasks=("min",),
            heldout_compositions=(),
        )
    )
    expected = {(e.prompt, " " + e.answer) for e in multiple_choice_view(suite.train, 3, seed=3)}
    rows = _rows(config)
    assert len(rows) == 40 and set(rows) <= expected
    assert all(prompt.endswith("answer:") and answer.strip() in "ABC" for prompt, answer in rows)
    assert not any(prompt.startswith("min:") for prompt, _ in rows)


def test_plain_format_is_the_default_and_unchanged():
    config = load_config(None, OVERRIDES)
    assert config.data.format == "plain"
    assert not any("answer:" in prompt for prompt, _ in _rows(config))
