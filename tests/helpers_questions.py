"""Multiple-choice questions from the synthetic task suite, shared by the RoMA tests."""

from __future__ import annotations

from moealign.data.tasks import (
    TaskExample,
    TaskSuiteConfig,
    build_task_suite,
    multiple_choice_view,
)


def task_questions(n_first: int, n_last: int = 6) -> list[TaskExample]:
    """Four-option questions from the first ``n_first`` and last ``n_last`` training examples
    of an addition/max/brackets suite (20 examples per task, seed 0)."""
    suite = build_task_suite(
        TaskSuiteConfig(
            examples_per_task=20,
            tasks=("addition", "max", "brackets"),
            heldout_tasks=(),
            heldout_compositions=(),
        )
    )
    return multiple_choice_view(suite.train[:n_first] + suite.train[-n_last:], n_options=4, seed=0)
