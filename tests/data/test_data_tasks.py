"""Synthetic task suite (DESIGN.md §7): answers against independent re-computations from the
prompt text, 70/15/15 splits, held-out sets, determinism, multiple-choice view."""

import random
import string
from collections import Counter

import pytest

from moealign.data.tasks import (
    CIPHER_KEY,
    TASK_FAMILIES,
    TaskSuiteConfig,
    build_task_suite,
    multiple_choice_view,
    task_id,
    to_multiple_choice,
)

CIPHER_TABLE = str.maketrans(string.ascii_lowercase, CIPHER_KEY)


def _balanced_by_reduction(brackets: str) -> bool:
    while "()" in brackets:
        brackets = brackets.replace("()", "")
    return brackets == ""


def _first_occurrences(symbols: list[str]) -> list[str]:
    out = []
    for s in symbols:
        if s not in out:
            out.append(s)
    return out


SEQUENCE_OPS = {
    "copy": lambda s: s,
    "reverse": lambda s: s[::-1],
    "sort": sorted,
    "dedup": _first_occurrences,
    "cipher": lambda s: " ".join(s).translate(CIPHER_TABLE).split(),
}


def reference_answer(prompt: str) -> str:
    """Recompute the answer from the prompt text alone."""
    assert prompt.endswith(" =")
    head, body = prompt[: -len(" =")].split(": ", 1)
    words = head.split()
    if words[0] == "add" and words[1:3] == ["then", "mod"]:
        a, b = body.split(" + ")
        return str((int(a) + int(b)) % int(words[3]))
    if head == "add":
        a, b = body.split(" + ")
        return str(int(a) + int(b))
    if head == "sub":
        a, b = body.split(" - ")
        return str(int(a) - int(b))
    if head == "mod":
        a, m = body.split(" % ")
        return str(int(a) % int(m))
    if words[0] == "count":
        return str(body.split().count(words[1]))
    if words[0] == "lookup":
        return dict(pair.split("=") for pair in body.split())[words[1]]
    if head == "balanced":
        return "yes" if _balanced_by_reduction(body.replace(" ", "")) else "no"
    if head in ("max", "min"):
        numbers = [int(x) for x in body.split()]
        return str(max(numbers) if head == "max" else min(numbers))
    if head == "first letters":
        return " ".join(w[0] for w in body.split())
    symbols = body.split()
    for step in head.split(" then "):
        symbols = SEQUENCE_OPS[step](symbols)
    return " ".join(symbols)


def small_config(**overrides) -> TaskSuiteConfig:
    return TaskSuiteConfig(**{"examples_per_task": 40, "eval_examples_per_task": 10, **overrides})


def test_at_least_twelve_base_families_and_valid_kinds():
    base = [f for f in TASK_FAMILIES.values() if not f.is_composition]
    assert len(base) >= 12
    assert any(f.is_composition for f in TASK_FAMILIES.values())
    assert {f.kind for f in TASK_FAMILIES.values()} == {"classification", "generation"}


@pytest.mark.parametrize("name", sorted(TASK_FAMILIES))
def test_every_family_answers_correctly(name):
    family = TASK_FAMILIES[name]
    rng = random.Random(123)
    for lengths in (family.train_lengths, family.long_lengths):
        for _ in range(150):
            example = family.generate(rng, rng.randint(*lengths))
            assert example.task == name
            assert example.answer == reference_answer(example.prompt), example


def test_brackets_has_both_answers_with_equal_bracket_counts():
    rng = random.Random(0)
    examples = [TASK_FAMILIES["brackets"].generate(rng, 4) for _ in range(200)]
    answers = Counter(e.answer for e in examples)
    assert answers["yes"] > 40 and answers["no"] > 40
    for e in examples:
        assert e.prompt.count("(") == e.prompt.count(")") == 4


def test_splits_are_70_15_15_per_task_and_disjoint():
    config = small_config(examples_per_task=60)
    suite = build_task_suite(config)
    for split, expected in ((suite.train, 42), (suite.val, 9), (suite.test, 9)):
        counts = Counter(e.task for e in split)
        assert counts == dict.fromkeys(config.seen_tasks, expected)
    prompts = [{e.prompt for e in split} for split in (suite.train, suite.val, suite.test)]
    assert sum(map(len, prompts)) == 60 * len(config.seen_tasks)  # no duplicates anywhere
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])


def test_heldout_tasks_and_compositions_never_reach_the_splits():
    config = small_config()
    suite = build_task_suite(config)
    seen = {e.task for split in (suite.train, suite.val, suite.test) for e in split}
    assert seen == set(config.seen_tasks)
    assert {e.task for e in suite.heldout_tasks} == set(config.heldout_tasks)
    assert {e.task for e in suite.heldout_compositions} == set(config.heldout_compositions)
    assert not seen & (set(config.heldout_tasks) | set(config.heldout_compositions))
    assert all(TASK_FAMILIES[t].is_composition for t in config.heldout_compositions)
    assert len(suite.heldout_tasks) == 10 * len(config.heldout_tasks)


def test_long_lengths_are_longer_than_training_and_unseen():
    suite = build_task_suite(small_config())
    split_prompts = {e.prompt for s in (suite.train, suite.val, suite.test) for e in s}
    assert {e.task for e in suite.long_lengths} == set(suite.seen_task_names)
    for e in suite.long_lengths:
        assert e.length > TASK_FAMILIES[e.task].train_lengths[1]
        assert e.prompt not in split_prompts
    for e in suite.train:
        lo, hi = TASK_FAMILIES[e.task].train_lengths
        assert lo <= e.length <= hi


def test_same_seed_same_suite_other_seed_other_suite():
    a, b = build_task_suite(small_config(seed=5)), build_task_suite(small_config(seed=5))
    c = build_task_suite(small_config(seed=6))
    for name in ("train", "val", "test", "heldout_tasks", "heldout_compositions", "long_lengths"):
        assert getattr(a, name) == getattr(b, name)
    assert [e.prompt for e in a.train] != [e.prompt for e in c.train]


def test_task_ids_are_stable_and_cover_every_task():
    suite = build_task_suite(small_config(heldout_tasks=("max",)))
    ids = [suite.task_id(name) for name in suite.task_names]
    assert ids == list(range(len(TASK_FAMILIES)))
    assert set(suite.task_names) == set(TASK_FAMILIES)
    assert task_id("addition") == sorted(TASK_FAMILIES).index("addition")
    with pytest.raises(ValueError, match="known tasks"):
        task_id("nope")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"heldout_tasks": ("nope",)}, "heldout_tasks contains 'nope'.*known tasks"),
        ({"heldout_compositions": ("sort",)}, "not a composition"),
        ({"train_fraction": 0.8}, "sum to 1"),
        ({"examples_per_task": 3}, "examples_per_task=3"),
        ({"tasks": ("copy",), "heldout_tasks": ("copy",), "heldout_compositions": ()}, "held out"),
        ({"train_lengths": (5, 2)}, "train_lengths"),
        ({"long_lengths": (20, 40)}, "lookup"),
    ],
)
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_config(**overrides)


def test_too_small_prompt_space_is_an_error():
    config = small_config(tasks=("addition",), heldout_tasks=(), heldout_compositions=())
    config.train_lengths = (1, 1)  # 100 distinct one-digit sums < 400 examples
    config.examples_per_task = 400
    with pytest.raises(ValueError, match="distinct prompts"):
        build_task_suite(config)


def test_multiple_choice_holds_gold_once_at_gold_letter():
    suite = build_task_suite(small_config())
    examples = suite.test + suite.heldout_tasks + suite.heldout_compositions
    view = multiple_choice_view(examples, n_options=4, seed=1)
    for original, mc in zip(examples, view, strict=True):
        n = 2 if original.task == "brackets" else 4
        assert len(mc.options) == len(set(mc.options)) == n
        assert mc.options.count(original.answer) == 1
        gold = "ABCD".index(mc.answer)
        assert mc.options[gold] == original.answer
        assert f"\n{mc.answer}. {original.answer}\n" in mc.prompt
        assert mc.prompt.startswith(original.prompt) and mc.prompt.endswith("answer:")
    # Deterministic and independent of list position.
    assert multiple_choice_view(examples[::-1], 4, seed=1) == view[::-1]
    letters = Counter(mc.answer for mc in view if len(mc.options) == 4)
    assert set(letters) == set("ABCD")


def test_multiple_choice_rejects_bad_option_counts():
    example = TASK_FAMILIES["copy"].generate(random.Random(0), 4)
    with pytest.raises(ValueError, match="n_options=1"):
        to_multiple_choice(example, 1, random.Random(0))
    tiny = TASK_FAMILIES["count"].generate(random.Random(0), 1)  # answers only 0 or 1
    with pytest.raises(ValueError, match="too few distinct answers"):
        to_multiple_choice(tiny, 4, random.Random(0))
