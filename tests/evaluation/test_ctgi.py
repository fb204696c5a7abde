"""Tests for moealign.evaluation.ctgi against the worked numbers of research-roma.md §3.1 (RoMA
Table 1)."""

import numpy as np
import pytest
from scipy import stats as scipy_stats

from moealign.evaluation.ctgi import ctgi, ctgi_from_accuracies, normalized_gain, transfer_ratio

TASKS = ["MMLU", "HellaSwag", "ARC-C", "ARC-E", "PIQA", "WinoGrande", "BoolQ", "GSM8K"]
NON_MATH = TASKS[:7]
# RoMA Table 1 accuracies (%), research-roma.md §2.
TABLE_1 = {
    "OLMoE": {
        "base": [57.8, 77.9, 51.3, 79.8, 80.7, 72.2, 75.4, 45.5],
        "oracle": [72.2, 91.5, 74.8, 91.4, 93.6, 87.7, 84.5, 53.2],
        "C3PO": [65.5, 85.3, 66.3, 87.4, 88.0, 82.7, 79.6, 50.8],
        "RoMA": [69.0, 86.7, 67.2, 88.0, 85.8, 81.8, 81.7, 49.4],
    },
    "DeepSeekMoE": {
        "base": [46.2, 78.0, 50.3, 73.8, 79.9, 70.1, 72.3, 62.2],
        "oracle": [63.8, 92.5, 70.8, 85.2, 90.3, 82.1, 83.2, 71.8],
        "C3PO": [55.4, 85.7, 61.6, 80.7, 85.8, 77.5, 78.2, 68.5],
        "RoMA": [56.8, 87.9, 61.4, 81.5, 85.2, 76.8, 80.6, 67.4],
    },
    "Qwen3": {
        "base": [74.2, 68.5, 56.8, 84.3, 78.5, 65.2, 81.3, 83.4],
        "oracle": [82.5, 80.3, 69.2, 92.6, 87.4, 77.3, 90.5, 90.9],
        "C3PO": [77.9, 74.1, 63.4, 88.1, 81.7, 71.9, 85.4, 86.0],
        "RoMA": [78.8, 74.8, 65.5, 88.6, 83.1, 73.8, 85.1, 86.3],
    },
}
# research-roma.md §3.1: (GSM8K only, 2 decimals), (7 non-math tasks, 3 decimals).
WORKED = {
    ("OLMoE", "RoMA"): (0.51, 0.645),
    ("DeepSeekMoE", "RoMA"): (0.54, 0.619),
    ("Qwen3", "RoMA"): (0.39, 0.564),
    ("OLMoE", "C3PO"): (0.69, 0.582),
    ("DeepSeekMoE", "C3PO"): (0.66, 0.562),
    ("Qwen3", "C3PO"): (0.35, 0.467),
}


def table_accuracies(model, row, tasks):
    return {t: a for t, a in zip(TASKS, TABLE_1[model][row], strict=True) if t in tasks}


@pytest.mark.parametrize(("model", "method"), list(WORKED))
def test_worked_numbers_from_table_1(model, method):
    gsm8k_ctgi, non_math_ctgi = WORKED[(model, method)]
    for tasks, decimals, expected in ((["GSM8K"], 2, gsm8k_ctgi), (NON_MATH, 3, non_math_ctgi)):
        result = ctgi_from_accuracies(
            table_accuracies(model, method, tasks),
            table_accuracies(model, "base", tasks),
            upper_bound=table_accuracies(model, "oracle", tasks),
            min_headroom=1.0,  # percent units: 1 point
        )
        assert round(result.value, decimals) == expected
        assert result.excluded_tasks == {}


def correctness(accuracy_percent, n=1000):
    """0/1 array of n items with the first accuracy·n correct (nested across systems)."""
    n_correct = round(accuracy_percent * n / 100)
    return np.r_[np.ones(n_correct), np.zeros(n - n_correct)]


def test_ctgi_on_per_example_arrays_reproduces_worked_gsm8k_numbers():
    olmoe = TABLE_1["OLMoE"]
    result = ctgi(
        {"GSM8K": correctness(olmoe["RoMA"][7])},
        {"GSM8K": correctness(olmoe["base"][7])},
        upper_bound={"GSM8K": correctness(olmoe["oracle"][7])},
        n_resamples=500,
    )
    assert result.value == pytest.approx((49.4 - 45.5) / (53.2 - 45.5))
    assert round(result.value, 2) == 0.51
    assert result.per_task_gain == {"GSM8K": pytest.approx(3.9 / 7.7)}
    assert result.ci_low <= result.value <= result.ci_high
    assert result.confidence == 0.95


def test_ctgi_per_example_all_tasks_matches_accuracy_version():
    rows = TABLE_1["DeepSeekMoE"]
    result = ctgi(
        {t: correctness(a) for t, a in zip(TASKS, rows["RoMA"], strict=True)},
        {t: correctness(a) for t, a in zip(TASKS, rows["base"], strict=True)},
        upper_bound={t: correctness(a) for t, a in zip(TASKS, rows["oracle"], strict=True)},
        n_resamples=200,
    )
    expected = np.mean(
        [
            (m - b) / (u - b)
            for m, b, u in zip(rows["RoMA"], rows["base"], rows["oracle"], strict=True)
        ]
    )
    assert result.value == pytest.approx(expected)


def test_constant_upper_bound_is_hake_normalised_gain():
    result = ctgi({"t": correctness(70.0)}, {"t": correctness(40.0)}, n_resamples=200)
    assert result.value == pytest.approx((0.7 - 0.4) / (1.0 - 0.4))
    per_task_constant = ctgi(
        {"t": correctness(70.0)}, {"t": correctness(40.0)}, upper_bound={"t": 0.9}
    )
    assert per_task_constant.value == pytest.approx(0.3 / 0.5)


def test_low_headroom_tasks_are_excluded_and_reported():
    model = {"easy": correctness(99.6), "hard": correctness(60.0), "edge": correctness(3.0, 100)}
    baseline = {"easy": correctness(99.5), "hard": correctness(50.0), "edge": correctness(2.0, 100)}
    oracle = {"easy": correctness(99.8), "hard": correctness(70.0), "edge": correctness(3.0, 100)}
    result = ctgi(model, baseline, upper_bound=oracle, n_resamples=300)
    assert set(result.excluded_tasks) == {"easy"}
    assert result.excluded_tasks["easy"] == pytest.approx(0.003)
    # "edge" has headroom exactly 1 point (0.03 − 0.02 is 0.00999... in floating point): kept.
    assert result.per_task_gain == {"hard": pytest.approx(0.5), "edge": pytest.approx(1.0)}
    assert result.value == pytest.approx(0.75)


def test_all_tasks_excluded_raises():
    with pytest.raises(ValueError, match="min_headroom"):
        ctgi({"t": correctness(99.9)}, {"t": correctness(99.5)})


@pytest.mark.parametrize(
    ("bounds", "statistic"),
    [
        (("ci_low", "ci_high"), lambda m, b: (m.mean() - b.mean()) / (1.0 - b.mean())),
        (("gain_ci_low", "gain_ci_high"), lambda m, b: m.mean() - b.mean()),  # the plain gain
    ],
)
def test_single_task_bootstrap_matches_scipy_paired_bootstrap(bounds, statistic):
    rng = np.random.default_rng(5)
    baseline = rng.binomial(1, 0.5, size=400).astype(float)
    model = np.where(rng.random(400) < 0.3, 1.0, baseline)
    result = ctgi({"t": model}, {"t": baseline}, n_resamples=4000, seed=3)
    oracle = scipy_stats.bootstrap(
        (model, baseline),
        statistic,
        paired=True,
        vectorized=False,
        n_resamples=4000,
        method="percentile",
        rng=np.random.default_rng(4),
    ).confidence_interval
    # Two independent bootstraps of 4000 replicates: their percentiles agree to about 0.01.
    assert getattr(result, bounds[0]) == pytest.approx(oracle.low, abs=0.015)
    assert getattr(result, bounds[1]) == pytest.approx(oracle.high, abs=0.015)
    assert result.accuracy_gain == pytest.approx(model.mean() - baseline.mean())


def test_multi_task_bootstrap_matches_loop_reference():
    rng = np.random.default_rng(6)
    sizes = {"a": 150, "b": 400}
    baseline = {t: rng.binomial(1, 0.4, size=n).astype(float) for t, n in sizes.items()}
    oracle = {t: np.maximum(b, rng.binomial(1, 0.6, size=b.size)) for t, b in baseline.items()}
    model = {t: np.where(rng.random(b.size) < 0.5, oracle[t], b) for t, b in baseline.items()}
    result = ctgi(model, baseline, upper_bound=oracle, n_resamples=3000, seed=0)

    reference_rng = np.random.default_rng(123)
    replicates = []
    for _ in range(3000):
        gains = []
        for t, n in sizes.items():
            index = reference_rng.integers(0, n, size=n)
            m, b, u = model[t][index].mean(), baseline[t][index].mean(), oracle[t][index].mean()
            gains.append((m - b) / (u - b))
        replicates.append(np.mean(gains))
    low, high = np.quantile(replicates, [0.025, 0.975])
    assert result.ci_low == pytest.approx(low, abs=0.02)
    assert result.ci_high == pytest.approx(high, abs=0.02)


def test_interval_contains_estimate_narrows_with_more_examples_and_is_seeded():
    def run(n, seed=0):
        rng = np.random.default_rng(n)
        baseline = rng.binomial(1, 0.5, size=n).astype(float)
        model = np.where(rng.random(n) < 0.2, 1.0, baseline)
        return ctgi({"t": model}, {"t": baseline}, n_resamples=1000, seed=seed)

    small, large = run(200), run(5000)
    for result in (small, large):
        assert result.ci_low <= result.value <= result.ci_high
    assert (large.ci_high - large.ci_low) < 0.5 * (small.ci_high - small.ci_low)
    assert run(200) == small
    assert run(200, seed=1) != small


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="same tasks"):
        ctgi({"a": [1, 0]}, {"b": [1, 0]})
    with pytest.raises(ValueError, match="upper_bound"):
        ctgi({"a": [1, 0]}, {"a": [0, 0]}, upper_bound={"b": 1.0})
    with pytest.raises(ValueError, match="same examples"):
        ctgi({"a": [1, 0, 1]}, {"a": [0, 0]})
    with pytest.raises(ValueError, match="per_task_model"):
        ctgi({"a": []}, {"a": []})
    with pytest.raises(ValueError, match="no tasks"):
        ctgi({}, {})
    with pytest.raises(ValueError, match="n_resamples"):
        ctgi({"a": [1, 0]}, {"a": [0, 0]}, n_resamples=0)
    with pytest.raises(ValueError, match="same number of seeds"):
        ctgi({"a": [[1, 0]], "b": [[1, 0], [0, 0]]}, {"a": [[0, 0]], "b": [[0, 0], [0, 0]]})


def test_normalized_gain_signs():
    assert normalized_gain(0.5, 0.5, 1.0) == 0.0
    assert normalized_gain(1.0, 0.5, 1.0) == 1.0
    assert normalized_gain(0.4, 0.5, 1.0) == pytest.approx(-0.2)


def test_transfer_ratio_hand_worked():
    # Held-out GSM8K gain 3.9 points, in-domain gains 11.2 and 8.8 (mean 10) -> 0.39.
    assert transfer_ratio(3.9, [11.2, 8.8]) == pytest.approx(0.39)
    assert transfer_ratio([1.0, 3.0], 4.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="indomain_gain"):
        transfer_ratio(1.0, [1.0, -1.0])


# --- CTGI beside the plain held-out gain; the small-headroom warning --------------------------

# The RoMA study's C3PO row (docs/roma_study.md, 60 questions per held-out task): correct
# answers of base, C3PO and oracle. CTGI = mean(−1/6, 0/5, 1/3) = +0.056 while the plain held-out
# gain is mean(−1, 0, +1)/60 = 0: two tasks with 5 and 3 questions of headroom (8.3 and 5
# points, under 10) carry (12 + 20)/(10 + 12 + 20) = 76% of the CTGI weight (weights ∝ 1/h).
C3PO_ROW = {
    "min": (14, 13, 20),
    "sort_then_reverse": (31, 31, 36),
    "cipher_then_reverse": (32, 33, 35),
}


def c3po_row_answers():
    def answers(n_correct):
        return np.r_[np.ones(n_correct), np.zeros(60 - n_correct)]

    base = {t: answers(b) for t, (b, _, _) in C3PO_ROW.items()}
    c3po = {t: answers(m) for t, (_, m, _) in C3PO_ROW.items()}
    oracle = {t: answers(u) for t, (_, _, u) in C3PO_ROW.items()}
    return c3po, base, oracle


def test_ctgi_reports_the_plain_gain_and_warns_when_small_headroom_dominates():
    c3po, base, oracle = c3po_row_answers()
    result = ctgi(c3po, base, upper_bound=oracle, n_resamples=500)
    assert result.value == pytest.approx((-1 / 6 + 0 + 1 / 3) / 3)
    assert result.accuracy_gain == pytest.approx(0.0, abs=1e-15)
    assert result.gain_ci_low < 0 < result.gain_ci_high
    assert result.headroom == pytest.approx(
        {"min": 0.1, "sort_then_reverse": 5 / 60, "cipher_then_reverse": 3 / 60}
    )
    assert result.small_headroom_share == pytest.approx(32 / 42)
    # "min" has exactly 10 points of headroom: not under 10.
    assert result.small_headroom_tasks == ["cipher_then_reverse", "sort_then_reverse"]
    assert "76%" in result.warning and "cipher_then_reverse" in result.warning
    # The same from accuracies (percent units, thresholds in points).
    percent = ctgi_from_accuracies(
        {t: 100 * m / 60 for t, (_, m, _) in C3PO_ROW.items()},
        {t: 100 * b / 60 for t, (b, _, _) in C3PO_ROW.items()},
        upper_bound={t: 100 * u / 60 for t, (_, _, u) in C3PO_ROW.items()},
        min_headroom=1.0,
        small_headroom=10.0,
    )
    assert percent.small_headroom_share == pytest.approx(32 / 42)
    assert percent.accuracy_gain == pytest.approx(0.0, abs=1e-12)


def test_no_warning_when_small_headroom_tasks_carry_at_most_half_the_weight():
    # Headrooms 0.05 and 0.5: weights 20 and 2, the small one carries 91%: a warning.
    # Headrooms 0.2 and 0.5: no task under 10 points, no warning.
    def answers(accuracy, n=100):
        return correctness(accuracy, n)

    warned = ctgi(
        {"a": answers(3), "b": answers(20)},
        {"a": answers(2), "b": answers(10)},
        upper_bound={"a": answers(7), "b": answers(60)},
        n_resamples=100,
    )
    assert warned.small_headroom_share == pytest.approx(20 / 22)
    assert warned.warning is not None
    calm = ctgi(
        {"a": answers(30), "b": answers(20)},
        {"a": answers(20), "b": answers(10)},
        upper_bound={"a": answers(40), "b": answers(60)},
        n_resamples=100,
    )
    assert calm.small_headroom_share == 0.0 and calm.small_headroom_tasks == []
    assert calm.warning is None
    assert calm.accuracy_gain == pytest.approx(0.1)


def test_plain_gain_covers_every_task_including_those_without_headroom():
    model = {"easy": correctness(99.0), "hard": correctness(60.0)}
    baseline = {"easy": correctness(99.5), "hard": correctness(50.0)}
    oracle = {"easy": correctness(99.8), "hard": correctness(70.0)}
    result = ctgi(model, baseline, upper_bound=oracle, n_resamples=200)
    assert set(result.excluded_tasks) == {"easy"}
    assert result.accuracy_gain == pytest.approx((-0.005 + 0.1) / 2)


def _seeded_answers(seed: int, n_seeds: int = 3, sizes=(("a", 60), ("b", 90))):
    """Per task (seeds × examples) 0/1 answers of a baseline and of a model whose gain over it
    differs from seed to seed."""
    rng = np.random.default_rng(seed)
    baseline, model = {}, {}
    for task, n in sizes:
        baseline[task] = rng.binomial(1, 0.4, size=(n_seeds, n)).astype(float)
        lift = rng.uniform(0.0, 0.4, size=(n_seeds, 1))  # the seed effect
        model[task] = np.where(rng.random((n_seeds, n)) < lift, 1.0, baseline[task])
    return model, baseline


@pytest.mark.parametrize("shared_examples", [False, True])
def test_hierarchical_bootstrap_over_seeds_matches_a_loop_reference(shared_examples):
    model, baseline = _seeded_answers(8)
    result = ctgi(model, baseline, n_resamples=3000, seed=0, shared_examples=shared_examples)
    # The point estimate pools every (seed, example): the 2-D input equals the concatenation.
    pooled = ctgi(
        {t: a.ravel() for t, a in model.items()}, {t: a.ravel() for t, a in baseline.items()}
    )
    assert result.value == pytest.approx(pooled.value) and result.accuracy_gain == pytest.approx(
        pooled.accuracy_gain
    )
    reference_rng = np.random.default_rng(99)
    replicates = []
    for _ in range(3000):
        seeds = reference_rng.integers(0, 3, size=3)  # one seed draw for every task
        gains = []
        for task in model:
            n = model[task].shape[1]
            shared = reference_rng.integers(0, n, size=n)
            m = b = 0.0
            for s in seeds:
                index = shared if shared_examples else reference_rng.integers(0, n, size=n)
                m += model[task][s, index].mean() / 3
                b += baseline[task][s, index].mean() / 3
            gains.append((m - b) / (1 - b))
        replicates.append(np.mean(gains))
    low, high = np.quantile(replicates, [0.025, 0.975])
    assert result.ci_low == pytest.approx(low, abs=0.02)
    assert result.ci_high == pytest.approx(high, abs=0.02)
    # Seed-level variance widens the interval beyond the pooled (seed, example) bootstrap.
    assert result.ci_high - result.ci_low > pooled.ci_high - pooled.ci_low
