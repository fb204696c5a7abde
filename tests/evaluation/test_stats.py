"""Tests for moealign.evaluation.stats against scipy.stats called directly and hand-worked
numbers."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from moealign.evaluation.stats import (
    bootstrap_indices,
    hierarchical_bootstrap_means,
    mean_confidence_interval,
    paired_bootstrap_ci,
    paired_t_test,
    seed_bootstrap_indices,
)


def mean_difference(a, b):
    return a.mean() - b.mean()


def test_mean_confidence_interval_matches_scipy_t_interval():
    values = [0.61, 0.64, 0.58, 0.66, 0.63]
    mean, half_width, n = mean_confidence_interval(values, confidence=0.9)
    low, high = scipy_stats.t.interval(
        0.9, len(values) - 1, loc=np.mean(values), scale=scipy_stats.sem(values)
    )
    assert n == 5
    assert mean == pytest.approx(np.mean(values))
    assert mean - half_width == pytest.approx(low)
    assert mean + half_width == pytest.approx(high)


def test_mean_confidence_interval_hand_worked_two_values():
    # mean 2, s = sqrt(2), sem = 1, t_{0.975, 1} = 12.7062...
    mean, half_width, n = mean_confidence_interval([1.0, 3.0])
    assert (mean, n) == (2.0, 2)
    assert half_width == pytest.approx(12.706204736, rel=1e-9)


def test_mean_confidence_interval_single_value_has_nan_half_width():
    mean, half_width, n = mean_confidence_interval([0.7])
    assert (mean, n) == (0.7, 1)
    assert math.isnan(half_width)


@pytest.mark.parametrize("confidence", [0.0, 1.0, 95])
def test_bad_confidence_rejected(confidence):
    with pytest.raises(ValueError, match="confidence"):
        mean_confidence_interval([1.0, 2.0], confidence=confidence)


def test_empty_values_rejected():
    with pytest.raises(ValueError, match="values"):
        mean_confidence_interval([])


def test_paired_t_test_matches_scipy_ttest_rel():
    rng = np.random.default_rng(1)
    a = rng.normal(0.7, 0.02, size=6)
    b = a - 0.01 + rng.normal(0, 0.01, size=6)
    mean_diff, half_width, p_value = paired_t_test(a, b)
    oracle = scipy_stats.ttest_rel(a, b)
    low, high = oracle.confidence_interval(0.95)
    assert p_value == pytest.approx(oracle.pvalue)
    assert mean_diff == pytest.approx(np.mean(a - b))
    assert mean_diff - half_width == pytest.approx(low)
    assert mean_diff + half_width == pytest.approx(high)


def test_paired_t_test_zero_variance_differences():
    assert paired_t_test([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])[2] == 0.0
    assert math.isnan(paired_t_test([1.0, 2.0], [1.0, 2.0])[2])


def test_paired_t_test_rejects_unpaired_input():
    with pytest.raises(ValueError, match="equal length"):
        paired_t_test([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="equal length >= 2"):
        paired_t_test([1.0], [2.0])


def test_paired_bootstrap_matches_scipy_bootstrap():
    rng = np.random.default_rng(3)
    a = rng.binomial(1, 0.7, size=300).astype(float)
    b = np.where(rng.random(300) < 0.8, a, 1 - a)
    estimate, low, high = paired_bootstrap_ci(a, b, mean_difference, n_resamples=4000, seed=1)
    oracle = scipy_stats.bootstrap(
        (a, b),
        mean_difference,
        paired=True,
        vectorized=False,
        n_resamples=4000,
        method="percentile",
        rng=np.random.default_rng(2),
    ).confidence_interval
    assert estimate == pytest.approx(a.mean() - b.mean())
    # Different random draws: agree to Monte-Carlo error (interval width is about 0.1).
    assert low == pytest.approx(oracle.low, abs=0.01)
    assert high == pytest.approx(oracle.high, abs=0.01)


def test_paired_bootstrap_keeps_pairs_together():
    # b = a + 0.1 exactly, so every paired resample gives exactly 0.1 -> a zero-width interval;
    # resampling a and b independently would not.
    a = np.random.default_rng(0).random(50)
    estimate, low, high = paired_bootstrap_ci(a + 0.1, a, mean_difference, n_resamples=200)
    assert estimate == pytest.approx(0.1)
    assert low == pytest.approx(0.1)
    assert high == pytest.approx(0.1)


def test_paired_bootstrap_contains_estimate_narrows_and_is_seeded():
    def interval(n):
        rng = np.random.default_rng(n)
        a = rng.binomial(1, 0.6, size=n).astype(float)
        b = rng.binomial(1, 0.5, size=n).astype(float)
        return paired_bootstrap_ci(a, b, mean_difference, n_resamples=1000)

    small, large = interval(100), interval(2500)
    for estimate, low, high in (small, large):
        assert low <= estimate <= high
    assert (large[2] - large[1]) < 0.5 * (small[2] - small[1])
    assert interval(100) == small


def test_paired_bootstrap_rejects_unpaired_input():
    with pytest.raises(ValueError, match="same examples"):
        paired_bootstrap_ci([1.0, 0.0], [1.0], mean_difference)


def test_interval_text_shows_mean_half_width_and_missing_values():
    from moealign.evaluation.stats import interval_text

    # Hand-worked: mean 2, s = 1, t_{0.975, 2} = 4.3027 → half width 4.3027 / √3 = 2.484,
    # written to 2 significant digits of the half width (moealign.tables.format_interval).
    assert interval_text([1.0, 2.0, 3.0]) == "2.0 ± 2.5"
    assert interval_text([0.5, None, float("nan")]) == "0.5 (n=1)"
    assert interval_text([None]) == "–"


def _two_level_scores(seed: int = 0) -> np.ndarray:
    """(1, S=4, N=30) scores with a seed effect, an example effect and noise."""
    rng = np.random.default_rng(seed)
    seed_effect = rng.normal(0, 0.3, size=(4, 1))
    example_effect = rng.normal(0, 0.5, size=(1, 30))
    return (seed_effect + example_effect + rng.normal(0, 0.2, size=(4, 30)))[None]


def test_hierarchical_bootstrap_variance_matches_the_nested_formula():
    scores = _two_level_scores()[0]
    rng = np.random.default_rng(1)
    seeds = seed_bootstrap_indices(4, 20000, rng)
    means = hierarchical_bootstrap_means(scores[None], seeds, rng)[:, 0]
    # Var* = σ²(seed means) / S + mean_s σ²_s / (S·N), population variances.
    expected = scores.mean(axis=1).var() / 4 + scores.var(axis=1).mean() / (4 * 30)
    assert means.var() == pytest.approx(expected, rel=0.05)
    assert means.mean() == pytest.approx(scores.mean(), abs=0.01)


def test_hierarchical_bootstrap_variance_matches_the_crossed_formula():
    scores = _two_level_scores()[0]
    rng = np.random.default_rng(2)
    seeds = seed_bootstrap_indices(4, 20000, rng)
    means = hierarchical_bootstrap_means(scores[None], seeds, rng, shared_examples=True)[:, 0]
    # Two-way decomposition x = μ + r_s + c_n + e_sn: Var* = σ²_r/S + σ²_c/N + σ²_e/(S·N).
    row = scores.mean(axis=1) - scores.mean()
    column = scores.mean(axis=0) - scores.mean()
    interaction = scores - scores.mean() - row[:, None] - column[None, :]
    expected = row.var() / 4 + column.var() / 30 + (interaction**2).mean() / 120
    assert means.var() == pytest.approx(expected, rel=0.05)
    # The example effect is shared by the seeds: the crossed variance is the larger one.
    nested = row.var() / 4 + scores.var(axis=1).mean() / 120
    assert expected > 2 * nested


def test_hierarchical_bootstrap_keeps_systems_paired_and_reduces_to_the_example_bootstrap():
    rng = np.random.default_rng(3)
    a = rng.binomial(1, 0.5, size=50).astype(float)
    scores = np.stack([a, a])[:, None, :]  # two identical systems, one seed
    draw = np.random.default_rng(7)
    means = hierarchical_bootstrap_means(scores, seed_bootstrap_indices(1, 300, draw), draw)
    np.testing.assert_array_equal(means[:, 0], means[:, 1])  # the same examples for both
    expected = np.concatenate(
        [a[index].mean(axis=1) for index in bootstrap_indices(50, 300, np.random.default_rng(7))]
    )
    np.testing.assert_allclose(means[:, 0], expected, rtol=1e-12)
