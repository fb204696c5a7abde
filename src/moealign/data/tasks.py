"""Synthetic multi-task suite with held-out tasks, compositions and lengths (DESIGN.md §7).

Every task family turns a random generator and a *length* (the size knob of that family: symbols,
digits, pairs, words) into a short plain-text example such as ``"reverse: a b c d ="`` with the
answer ``"d c b a"``, small enough for a byte or BPE language model to learn.

The suite follows the practitioners' guide (research/000, Step 4): per seen task a 70/15/15
train/val/test split; held-out task families and held-out compositions that never reach training;
and examples of the seen tasks at longer lengths than trained on (length shift). All of it is a
pure function of :class:`TaskSuiteConfig`; randomness comes from ``random.Random`` seeded with a
string (Python hashes string seeds with SHA-512, so the suite does not depend on
``PYTHONHASHSEED``).
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

TaskKind = Literal["classification", "generation"]

LETTERS = string.ascii_lowercase
# A fixed substitution cipher (a permutation of a..z): the "translation" task maps plain letters
# to these, position by position.
CIPHER_KEY = "qwertyuiopasdfghjklzxcvbnm"
_CIPHER = dict(zip(LETTERS, CIPHER_KEY, strict=True))
OPTION_LETTERS = string.ascii_uppercase


@dataclass(frozen=True)
class TaskExample:
    """One prompt/answer pair; ``options`` is non-empty only for a multiple-choice view.

    ``length`` is the size knob the example was generated with (its family's meaning).
    """

    task: str
    prompt: str
    answer: str
    options: tuple[str, ...] = ()
    length: int = 0


@dataclass(frozen=True)
class TaskFamily:
    """A task generator. ``kind`` says how it is scored: "classification" answers are short and
    closed (exact match / accuracy); "generation" answers are sequences (also BLEU/ROUGE).

    ``train_lengths`` and ``long_lengths`` are inclusive default ranges of the length knob for
    training and for length-generalisation evaluation; ``length_limits`` bounds what the
    generator accepts; ``components`` names the families a composition applies in order.
    """

    name: str
    kind: TaskKind
    generate_answer: Callable[[random.Random, int], tuple[str, str]] = field(repr=False)
    train_lengths: tuple[int, int]
    long_lengths: tuple[int, int]
    length_limits: tuple[int, int] = (1, 64)
    components: tuple[str, ...] = ()
    answer_space: tuple[str, ...] = ()

    def generate(self, rng: random.Random, length: int) -> TaskExample:
        lo, hi = self.length_limits
        if not lo <= length <= hi:
            raise ValueError(
                f"length={length} is outside the accepted range [{lo}, {hi}] of task {self.name!r}"
            )
        prompt, answer = self.generate_answer(rng, length)
        return TaskExample(task=self.name, prompt=prompt, answer=answer, length=length)

    @property
    def is_composition(self) -> bool:
        return bool(self.components)


# --- sequence transforms shared by base families and their compositions --------------------


def _dedup(symbols: list[str]) -> list[str]:
    return list(dict.fromkeys(symbols))


SEQUENCE_TRANSFORMS: dict[str, Callable[[list[str]], list[str]]] = {
    "copy": list,
    "reverse": lambda s: s[::-1],
    "sort": sorted,
    "dedup": _dedup,
    "cipher": lambda s: [_CIPHER[c] for c in s],
}
# Alphabets per transform: a small one for dedup so that repeats occur.
_SEQUENCE_ALPHABETS = {"copy": LETTERS, "reverse": LETTERS, "sort": LETTERS, "dedup": "abcdef"}


def _sequence_task(steps: Sequence[str], alphabet: str) -> Callable[..., tuple[str, str]]:
    def generate(rng: random.Random, length: int) -> tuple[str, str]:
        symbols = [rng.choice(alphabet) for _ in range(length)]
        out = symbols
        for step in steps:
            out = SEQUENCE_TRANSFORMS[step](out)
        return f"{' then '.join(steps)}: {' '.join(symbols)} =", " ".join(out)

    return generate


def _number(rng: random.Random, digits: int) -> int:
    """A uniform integer with exactly ``digits`` digits (0..9 for one digit)."""
    return rng.randint(0, 9) if digits == 1 else rng.randint(10 ** (digits - 1), 10**digits - 1)


def _addition(rng: random.Random, length: int) -> tuple[str, str]:
    a, b = _number(rng, length), _number(rng, rng.randint(1, length))
    return f"add: {a} + {b} =", str(a + b)


def _subtraction(rng: random.Random, length: int) -> tuple[str, str]:
    a, b = _number(rng, length), _number(rng, rng.randint(1, length))
    a, b = max(a, b), min(a, b)
    return f"sub: {a} - {b} =", str(a - b)


def _modulo(rng: random.Random, length: int) -> tuple[str, str]:
    a, m = _number(rng, length), rng.randint(2, 9)
    return f"mod: {a} % {m} =", str(a % m)


def _add_then_mod(rng: random.Random, length: int) -> tuple[str, str]:
    a, b, m = _number(rng, length), _number(rng, rng.randint(1, length)), rng.randint(2, 9)
    return f"add then mod {m}: {a} + {b} =", str((a + b) % m)


def _count(rng: random.Random, length: int) -> tuple[str, str]:
    symbols = [rng.choice("abcde") for _ in range(length)]
    target = rng.choice("abcde")
    return f"count {target}: {' '.join(symbols)} =", str(symbols.count(target))


def _lookup(rng: random.Random, length: int) -> tuple[str, str]:
    keys = rng.sample(LETTERS, length)
    values = [str(rng.randint(0, 9)) for _ in keys]
    query = rng.randrange(length)
    pairs = " ".join(f"{k}={v}" for k, v in zip(keys, values, strict=True))
    return f"lookup {keys[query]}: {pairs} =", values[query]


def _is_balanced(brackets: Iterable[str]) -> bool:
    depth = 0
    for char in brackets:
        depth += 1 if char == "(" else -1
        if depth < 0:
            return False
    return depth == 0


def _brackets(rng: random.Random, length: int) -> tuple[str, str]:
    """``length`` pairs: always ``length`` "(" and ``length`` ")" so counting cannot decide."""
    chars = ["("] * length + [")"] * length
    if rng.random() < 0.5:
        # A random walk that never closes more than it opened and ends at depth 0.
        chars, depth, opened = [], 0, 0
        while len(chars) < 2 * length:
            can_open, can_close = opened < length, depth > 0
            if can_open and (not can_close or rng.random() < 0.5):
                chars.append("(")
                depth, opened = depth + 1, opened + 1
            else:
                chars.append(")")
                depth -= 1
    else:
        while _is_balanced(chars):
            rng.shuffle(chars)
    return f"balanced: {' '.join(chars)} =", "yes" if _is_balanced(chars) else "no"


def _word(rng: random.Random) -> str:
    consonants, vowels = "bcdfghjklmnpqrstvwz", "aeiou"
    return "".join(
        rng.choice(consonants if i % 2 == 0 else vowels) for i in range(rng.randint(3, 6))
    )


def _first_letters(rng: random.Random, length: int) -> tuple[str, str]:
    words = [_word(rng) for _ in range(length)]
    return f"first letters: {' '.join(words)} =", " ".join(w[0] for w in words)


def _extremum(name: str, pick: Callable[[list[int]], int]) -> Callable[..., tuple[str, str]]:
    def generate(rng: random.Random, length: int) -> tuple[str, str]:
        numbers = [rng.randint(0, 99) for _ in range(length)]
        return f"{name}: {' '.join(map(str, numbers))} =", str(pick(numbers))

    return generate


_SEQ_TRAIN, _SEQ_LONG = (3, 8), (10, 14)
_DIGITS_TRAIN, _DIGITS_LONG = (1, 4), (5, 7)
_ITEMS_TRAIN, _ITEMS_LONG = (2, 6), (8, 10)

TASK_FAMILIES: dict[str, TaskFamily] = {
    f.name: f
    for f in [
        *(
            TaskFamily(name, "generation", _sequence_task([name], alphabet), _SEQ_TRAIN, _SEQ_LONG)
            for name, alphabet in _SEQUENCE_ALPHABETS.items()
        ),
        TaskFamily(
            "cipher", "generation", _sequence_task(["cipher"], LETTERS), _SEQ_TRAIN, _SEQ_LONG
        ),
        TaskFamily("first_letters", "generation", _first_letters, _ITEMS_TRAIN, _ITEMS_LONG),
        TaskFamily("addition", "classification", _addition, _DIGITS_TRAIN, _DIGITS_LONG),
        TaskFamily("subtraction", "classification", _subtraction, _DIGITS_TRAIN, _DIGITS_LONG),
        TaskFamily("modulo", "classification", _modulo, _DIGITS_TRAIN, _DIGITS_LONG),
        TaskFamily("count", "classification", _count, (3, 10), (12, 16)),
        TaskFamily(
            "lookup", "classification", _lookup, _ITEMS_TRAIN, _ITEMS_LONG, length_limits=(1, 26)
        ),
        TaskFamily(
            "brackets", "classification", _brackets, (1, 8), (9, 12), answer_space=("no", "yes")
        ),
        TaskFamily("max", "classification", _extremum("max", max), _ITEMS_TRAIN, _ITEMS_LONG),
        TaskFamily("min", "classification", _extremum("min", min), _ITEMS_TRAIN, _ITEMS_LONG),
        # Compositions: the components apply left to right ("sort then reverse" = reverse∘sort).
        *(
            TaskFamily(
                "_then_".join(steps),
                "generation",
                _sequence_task(steps, alphabet),
                _SEQ_TRAIN,
                _SEQ_LONG,
                components=steps,
            )
            for steps, alphabet in [
                (("sort", "reverse"), LETTERS),
                (("sort", "dedup"), "abcdef"),
                (("cipher", "reverse"), LETTERS),
            ]
        ),
        TaskFamily(
            "add_then_mod",
            "classification",
            _add_then_mod,
            _DIGITS_TRAIN,
            _DIGITS_LONG,
            components=("addition", "modulo"),
        ),
    ]
}

# Stable ids over every family (seen or held out), independent of the suite configuration.
TASK_IDS: dict[str, int] = {name: i for i, name in enumerate(sorted(TASK_FAMILIES))}


def task_id(name: str) -> int:
    """The stable integer id of a task family (sorted-name order over all families)."""
    if name not in TASK_IDS:
        raise ValueError(f"task={name!r} is not a known task; known tasks: {sorted(TASK_IDS)}")
    return TASK_IDS[name]


@dataclass
class TaskSuiteConfig:
    """What :func:`build_task_suite` builds.

    ``tasks`` (empty: all families) are the families in the suite; ``heldout_tasks`` and
    ``heldout_compositions`` are taken out of training and evaluated only. ``train_lengths`` /
    ``long_lengths`` override every family's default ranges when given. ``eval_examples_per_task``
    sizes each held-out and long-length set.
    """

    seed: int = 0
    examples_per_task: int = 1000
    train_fraction: float = 0.7
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    tasks: tuple[str, ...] = ()
    heldout_tasks: tuple[str, ...] = ("subtraction", "min")
    heldout_compositions: tuple[str, ...] = ("sort_then_reverse", "add_then_mod")
    train_lengths: tuple[int, int] | None = None
    long_lengths: tuple[int, int] | None = None
    eval_examples_per_task: int = 150

    def __post_init__(self) -> None:
        self.tasks = tuple(self.tasks) or tuple(TASK_FAMILIES)
        self.heldout_tasks = tuple(self.heldout_tasks)
        self.heldout_compositions = tuple(self.heldout_compositions)
        for field_name in ("tasks", "heldout_tasks", "heldout_compositions"):
            for name in getattr(self, field_name):
                if name not in TASK_FAMILIES:
                    raise ValueError(
                        f"{field_name} contains {name!r}, which is not a known task; "
                        f"known tasks: {sorted(TASK_FAMILIES)}"
                    )
                if name not in self.tasks:
                    raise ValueError(
                        f"{field_name} contains {name!r}, which is not in tasks={self.tasks}"
                    )
        compositions = sorted(n for n, f in TASK_FAMILIES.items() if f.is_composition)
        for name in self.heldout_compositions:
            if name not in compositions:
                raise ValueError(
                    f"heldout_compositions contains {name!r}, which is not a composition; "
                    f"accepted: {compositions}"
                )
        if overlap := set(self.heldout_tasks) & set(self.heldout_compositions):
            raise ValueError(
                f"heldout_tasks and heldout_compositions share {sorted(overlap)}; "
                "each held-out task belongs to one of them"
            )
        if not self.seen_tasks:
            raise ValueError(f"every task in tasks={self.tasks} is held out; none left to train")
        fractions = (self.train_fraction, self.val_fraction, self.test_fraction)
        for field_name, value in zip(
            ("train_fraction", "val_fraction", "test_fraction"), fractions, strict=True
        ):
            if not 0.0 < value < 1.0:
                raise ValueError(f"{field_name}={value} must lie in (0, 1)")
        if abs(sum(fractions) - 1.0) > 1e-9:
            raise ValueError(
                f"train/val/test fractions {fractions} sum to {sum(fractions)}; they must sum to 1"
            )
        if min(self.split_sizes()) < 1:
            raise ValueError(
                f"examples_per_task={self.examples_per_task} gives split sizes "
                f"{self.split_sizes()}; each split needs at least one example"
            )
        if self.eval_examples_per_task < 1:
            raise ValueError(
                f"eval_examples_per_task={self.eval_examples_per_task} must be at least 1"
            )
        for field_name in ("train_lengths", "long_lengths"):
            lengths = getattr(self, field_name)
            if lengths is None:
                continue
            lengths = tuple(lengths)
            setattr(self, field_name, lengths)
            if len(lengths) != 2 or not 1 <= lengths[0] <= lengths[1]:
                raise ValueError(
                    f"{field_name}={lengths} must be None or (low, high) with 1 <= low <= high"
                )
            for name in self.tasks:
                lo, hi = TASK_FAMILIES[name].length_limits
                if not lo <= lengths[0] <= lengths[1] <= hi:
                    raise ValueError(
                        f"{field_name}={lengths} is outside task {name!r}'s accepted lengths "
                        f"[{lo}, {hi}]"
                    )

    @property
    def seen_tasks(self) -> tuple[str, ...]:
        held = set(self.heldout_tasks) | set(self.heldout_compositions)
        return tuple(n for n in self.tasks if n not in held)

    def split_sizes(self) -> tuple[int, int, int]:
        n = self.examples_per_task
        n_train = round(n * self.train_fraction)
        n_val = round(n * self.val_fraction)
        return n_train, n_val, n - n_train - n_val

    def lengths_for(self, name: str, long: bool = False) -> tuple[int, int]:
        family = TASK_FAMILIES[name]
        if long:
            return self.long_lengths or family.long_lengths
        return self.train_lengths or family.train_lengths


@dataclass
class TaskSuite:
    """Seen-task splits plus evaluation-only sets (held-out tasks, compositions, long lengths)."""

    config: TaskSuiteConfig
    train: list[TaskExample]
    val: list[TaskExample]
    test: list[TaskExample]
    heldout_tasks: list[TaskExample]
    heldout_compositions: list[TaskExample]
    long_lengths: list[TaskExample]

    @property
    def task_names(self) -> tuple[str, ...]:
        """Every task family known to the id mapping, in id order."""
        return tuple(sorted(TASK_IDS, key=TASK_IDS.__getitem__))

    @property
    def seen_task_names(self) -> tuple[str, ...]:
        return self.config.seen_tasks

    def task_id(self, name: str) -> int:
        return task_id(name)

    def evaluation_sets(self) -> dict[str, list[TaskExample]]:
        return {
            "test": self.test,
            "heldout_tasks": self.heldout_tasks,
            "heldout_compositions": self.heldout_compositions,
            "long_lengths": self.long_lengths,
        }


def _unique_examples(
    family: TaskFamily,
    rng: random.Random,
    lengths: tuple[int, int],
    count: int,
    exclude: set[str],
) -> list[TaskExample]:
    """``count`` examples with distinct prompts not in ``exclude``; ValueError if the family's
    prompt space at these lengths is too small to supply them."""
    examples: dict[str, TaskExample] = {}
    attempts = 0
    max_attempts = 50 * count + 1000
    while len(examples) < count:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(
                f"task {family.name!r} produced only {len(examples)} distinct prompts at "
                f"lengths {lengths} after {max_attempts} draws; ask for fewer than {count} "
                "examples or widen the lengths"
            )
        example = family.generate(rng, rng.randint(*lengths))
        if example.prompt not in exclude and example.prompt not in examples:
            examples[example.prompt] = example
    return list(examples.values())


def build_task_suite(config: TaskSuiteConfig) -> TaskSuite:
    """Generate the suite: per seen task ``examples_per_task`` distinct prompts split 70/15/15
    (by ``config`` fractions), and the evaluation-only sets. Deterministic in ``config``."""
    train, val, test, long = [], [], [], []
    n_train, n_val, _ = config.split_sizes()
    for name in config.seen_tasks:
        family = TASK_FAMILIES[name]
        rng = random.Random(f"moealign-tasks:{config.seed}:{name}")
        examples = _unique_examples(
            family, rng, config.lengths_for(name), config.examples_per_task, set()
        )
        train += examples[:n_train]
        val += examples[n_train : n_train + n_val]
        test += examples[n_train + n_val :]
        seen_prompts = {e.prompt for e in examples}
        long += _unique_examples(
            family,
            rng,
            config.lengths_for(name, long=True),
            config.eval_examples_per_task,
            seen_prompts,
        )

    def evaluation_set(names: tuple[str, ...]) -> list[TaskExample]:
        out = []
        for name in names:
            rng = random.Random(f"moealign-tasks:{config.seed}:{name}")
            out += _unique_examples(
                TASK_FAMILIES[name],
                rng,
                config.lengths_for(name),
                config.eval_examples_per_task,
                set(),
            )
        return out

    return TaskSuite(
        config=config,
        train=train,
        val=val,
        test=test,
        heldout_tasks=evaluation_set(config.heldout_tasks),
        heldout_compositions=evaluation_set(config.heldout_compositions),
        long_lengths=long,
    )


# --- multiple-choice view (RoMA scores routers on multiple-choice questions) ------------------


def to_multiple_choice(example: TaskExample, n_options: int, rng: random.Random) -> TaskExample:
    """A multiple-choice version of ``example``: the gold answer and ``n_options - 1`` distinct
    distractors (answers of fresh examples of the same family at the same length), shuffled.

    The prompt lists the options as lettered lines and ends with ``"answer:"``; ``answer`` is the
    gold letter and ``options`` the option texts. Families with a closed answer space smaller
    than ``n_options`` (yes/no) offer that whole space.
    """
    if example.task not in TASK_FAMILIES:
        raise ValueError(
            f"example.task={example.task!r} is not a known task; known: {sorted(TASK_FAMILIES)}"
        )
    if not 2 <= n_options <= len(OPTION_LETTERS):
        raise ValueError(f"n_options={n_options} must lie in [2, {len(OPTION_LETTERS)}]")
    family = TASK_FAMILIES[example.task]
    if family.answer_space:
        n_options = min(n_options, len(family.answer_space))
        pool = [a for a in family.answer_space if a != example.answer]
        distractors = rng.sample(pool, n_options - 1)
    else:
        distractors = []
        for _ in range(200 * n_options):
            candidate = family.generate(rng, example.length).answer
            if candidate != example.answer and candidate not in distractors:
                distractors.append(candidate)
                if len(distractors) == n_options - 1:
                    break
        else:
            raise ValueError(
                f"task {example.task!r} at length {example.length} has too few distinct answers "
                f"for n_options={n_options}"
            )
    options = [example.answer, *distractors]
    rng.shuffle(options)
    gold = OPTION_LETTERS[options.index(example.answer)]
    lines = [f"{OPTION_LETTERS[i]}. {text}" for i, text in enumerate(options)]
    prompt = "\n".join([example.prompt, *lines, "answer:"])
    return replace(example, prompt=prompt, answer=gold, options=tuple(options))


def multiple_choice_view(
    examples: Sequence[TaskExample], n_options: int = 4, seed: int = 0
) -> list[TaskExample]:
    """:func:`to_multiple_choice` over a list; each example's generator is seeded from
    (seed, task, prompt), so the view of an example does not depend on its position."""
    return [
        to_multiple_choice(e, n_options, random.Random(f"moealign-mc:{seed}:{e.task}:{e.prompt}"))
        for e in examples
    ]
