"""CTGI and transfer ratio of a study variant against its baseline (moealign.studies.transfer)."""

import math
from pathlib import Path

import numpy as np
import pytest

from moealign.evaluation.ctgi import ctgi
from moealign.studies.results import RunRecord, RunSet
from moealign.studies.transfer import paired_task_answers, variant_transfer


def _set(per_task: dict[str, list[int]], seed: int) -> dict:
    """Answers of one run; the references name the seed (each seed its own examples)."""
    return {
        "tasks": {
            task: {
                "correct": correct,
                "references": [f"{task}{seed}.{i}" for i in range(len(correct))],
            }
            for task, correct in per_task.items()
        }
    }


def _run(
    variant: str, seed: int, seen: dict, heldout: dict, references_seed: int | None = None
) -> RunRecord:
    """``references_seed``: the seed the references name (default ``seed``)."""
    data = seed if references_seed is None else references_seed
    final = {"tasks": {"sets": {"test": _set(seen, data), "heldout_tasks": _set(heldout, data)}}}
    return RunRecord(Path(f"{variant}{seed}"), variant, seed, "finished", final_eval=final)


def _ones(k: int, n: int = 10) -> list[int]:
    return [1] * k + [0] * (n - k)


def test_gains_ctgi_and_transfer_ratio_by_hand():
    # Seeds 0 and 1; held-out task h: model 6/10 and 4/10, baseline 2/10 and 2/10.
    # Seen task s: model 9/10 and 9/10, baseline 8/10 and 7/10.
    runs = [
        _run("m", 0, {"s": _ones(9)}, {"h": _ones(6)}),
        _run("m", 1, {"s": _ones(9)}, {"h": _ones(4)}),
        _run("b", 0, {"s": _ones(8)}, {"h": _ones(2)}),
        _run("b", 1, {"s": _ones(7)}, {"h": _ones(2)}),
        _run("m", 2, {"s": _ones(1)}, {"h": _ones(1)}),  # no baseline run of seed 2: unpaired
    ]
    found = variant_transfer(RunSet(runs), "m", "b", n_resamples=500)
    assert found.seeds == [0, 1]
    assert found.heldout_gain == pytest.approx(0.5 - 0.2)
    assert found.indomain_gain == pytest.approx(0.9 - 0.75)
    assert found.transfer_ratio == pytest.approx(0.3 / 0.15)
    assert found.ctgi.value == pytest.approx((0.5 - 0.2) / (1 - 0.2))
    # The interval is the hierarchical bootstrap over seeds (rows, seed 0 first), then
    # examples; the seeds' references differ here (nested: examples drawn per seed).
    reference = ctgi(
        {"h": [_ones(6), _ones(4)]}, {"h": [_ones(2), _ones(2)]}, n_resamples=500, seed=0
    )
    assert (found.ctgi.ci_low, found.ctgi.ci_high) == (reference.ci_low, reference.ci_high)


def test_seeds_that_answered_the_same_examples_get_the_crossed_bootstrap():
    runs = [
        _run("m", seed, {"s": _ones(9)}, {"h": _ones(k)}, references_seed=0)
        for seed, k in ((0, 6), (1, 4), (2, 5))
    ] + [_run("b", seed, {"s": _ones(8)}, {"h": _ones(2)}, references_seed=0) for seed in range(3)]
    answers = paired_task_answers(runs[:3], runs[3:], ["heldout_tasks"])
    assert answers.shared_examples and answers.seeds == [0, 1, 2]
    assert answers.model["h"].shape == (3, 10)
    found = variant_transfer(RunSet(runs), "m", "b", n_resamples=400)
    reference = ctgi(answers.model, answers.baseline, n_resamples=400, seed=0, shared_examples=True)
    assert (found.ctgi.ci_low, found.ctgi.ci_high) == (reference.ci_low, reference.ci_high)
    unequal = [_run("m", 1, {}, {"h": _ones(3, n=12)}), _run("b", 1, {}, {"h": _ones(3, n=12)})]
    with pytest.raises(ValueError, match="different numbers of examples"):
        paired_task_answers([runs[0], unequal[0]], [runs[3], unequal[1]], ["heldout_tasks"])


def test_equal_in_domain_accuracy_gives_no_transfer_ratio_despite_rounding():
    # Per-task differences −0.6, +0.1, +0.5 sum to a rounding residue, not exactly 0.
    assert np.mean([0.1 - 0.7, 0.2 - 0.1, 0.7 - 0.2]) != 0.0
    seen_m = {"a": _ones(1), "b": _ones(2), "c": _ones(7)}
    seen_b = {"a": _ones(7), "b": _ones(1), "c": _ones(2)}
    runs = [_run("m", 0, seen_m, {"h": _ones(3)}), _run("b", 0, seen_b, {"h": _ones(3)})]
    found = variant_transfer(RunSet(runs), "m", "b", n_resamples=50)
    assert found.indomain_gain == 0.0 and found.heldout_gain == 0.0
    assert math.isnan(found.transfer_ratio)


def test_no_headroom_and_no_shared_seed():
    runs = [
        _run("m", 0, {"s": _ones(5)}, {"h": _ones(10)}),
        _run("b", 0, {"s": _ones(5)}, {"h": _ones(10)}),
    ]
    found = variant_transfer(RunSet(runs), "m", "b", n_resamples=50)
    assert found.ctgi is None and "headroom" in found.note
    alone = RunSet(
        [_run("m", 0, {"s": _ones(5)}, {"h": _ones(2)}), _run("b", 1, {}, {"h": _ones(2)})]
    )
    assert variant_transfer(alone, "m", "b") is None
    answers = paired_task_answers(alone.of_variant("m"), alone.of_variant("b"), ["heldout_tasks"])
    assert (answers.model, answers.baseline, answers.seeds) == ({}, {}, [])
