"""Multiple-choice questions from a JSONL file, for ``moealign roma --hf-model PATH --questions
FILE.jsonl`` (DESIGN.md §5 on a model whose training data moealign does not know).

One JSON object per line: ``question`` (the prompt), ``options`` (2 to 26 option texts),
``answer`` (the gold option: its letter A, B, ... or its text) and ``task`` (a name: questions
are grouped, trained and reported per task). :func:`split_questions` holds out whole tasks and
splits the rest into a training pool and a test set.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from moealign.data.corpus import Document, split_documents
from moealign.data.tasks import OPTION_LETTERS, TaskExample
from moealign.io import iter_jsonl

FIELDS = ("question", "options", "answer", "task")


def _question(record: object, where: str) -> TaskExample:
    if not isinstance(record, dict):
        raise ValueError(f"{where} is a JSON {type(record).__name__}, not an object")
    missing = [field for field in FIELDS if field not in record]
    if missing:
        raise ValueError(f"{where} lacks {missing}; a question has the fields {list(FIELDS)}")
    question, options, answer, task = (record[field] for field in FIELDS)
    if not isinstance(question, str) or not question or not isinstance(task, str) or not task:
        raise ValueError(f"{where}: 'question' and 'task' must be non-empty strings")
    if (
        not isinstance(options, list)
        or not 2 <= len(options) <= len(OPTION_LETTERS)
        or not all(isinstance(option, str) and option for option in options)
    ):
        raise ValueError(f"{where}: 'options' must be a list of 2 to 26 non-empty strings")
    letters = OPTION_LETTERS[: len(options)]
    if answer in letters:
        gold = answer
    elif answer in options:
        gold = letters[options.index(answer)]
    else:
        raise ValueError(
            f"{where}: 'answer' is {answer!r}; expected a letter among {list(letters)} or one of "
            "the options"
        )
    return TaskExample(task=task, prompt=question, answer=gold, options=tuple(options))


def load_questions(path: str | os.PathLike) -> list[TaskExample]:
    """The questions of a JSONL file as multiple-choice :class:`TaskExample` s (prompt = the
    question, answer = the gold letter), in file order; ValueError naming the file and line of
    a bad record."""
    questions = [
        _question(record, f"{path} line {number}")
        for number, record in iter_jsonl(path, tolerate_torn_tail=False)
    ]
    if not questions:
        raise ValueError(f"{path} holds no question")
    return questions


def split_questions(
    questions: Sequence[TaskExample],
    heldout_tasks: Sequence[str],
    test_fraction: float = 0.3,
    seed: int = 0,
) -> tuple[list[TaskExample], list[TaskExample], list[TaskExample]]:
    """(training pool, test set, held-out set): the questions of ``heldout_tasks`` are held
    out; the others go to the test set with probability ``test_fraction``, decided by the
    document-level hash split of :func:`moealign.data.corpus.split_documents` on each
    question's position in the file (deterministic; file order kept within each part)."""
    tasks = sorted({q.task for q in questions})
    unknown = sorted(set(heldout_tasks) - set(tasks))
    if unknown or not heldout_tasks:
        raise ValueError(
            f"--heldout-tasks: got {list(heldout_tasks)}; expected at least one of the "
            f"questions' tasks {tasks}" + (f" (unknown: {unknown})" if unknown else "")
        )
    heldout = [q for q in questions if q.task in heldout_tasks]
    seen = [q for q in questions if q.task not in heldout_tasks]
    if not seen:
        raise ValueError(f"--heldout-tasks: every task {tasks} is held out; none left to train on")
    positions = [Document(name=f"{index:09d}", text="") for index in range(len(seen))]
    train, _, test = split_documents(positions, seed, (1 - test_fraction, 0.0, test_fraction))
    pool, test_set = ([seen[int(d.name)] for d in part] for part in (train, test))
    if not pool or not test_set:
        raise ValueError(
            f"the {len(seen)} questions of the tasks not held out are too few to split into a "
            f"training pool and a test set ({len(pool)} and {len(test_set)}); give more"
        )
    return pool, test_set, heldout
