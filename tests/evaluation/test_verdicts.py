"""Tests for moealign.evaluation.verdicts against scipy.stats, statsmodels and hand-worked
numbers."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from moealign.evaluation.verdicts import (
    bootstrap_comparison,
    default_margin,
    format_p,
    holm,
    holm_adjust,
    interval_comparison,
    judged_rows,
    paired_comparison,
)

A = [3.10, 3.02, 3.15, 3.08, 3.11]
B = [3.05, 3.01, 3.12, 3.02, 3.09]


def test_paired_difference_p_and_interval_match_scipy():
    c = paired_comparison(A, B, margin=0.05)
    d = np.subtract(A, B)
    assert c.p_value == pytest.approx(scipy_stats.ttest_rel(A, B).pvalue, rel=1e-9)
    low, high = scipy_stats.ttest_rel(A, B).confidence_interval(0.95)
    assert (c.low, c.high) == (pytest.approx(low), pytest.approx(high))
    assert c.delta == pytest.approx(d.mean())
    assert c.n == 5


def test_tost_matches_two_one_sided_scipy_tests():
    margin = 0.05
    c = paired_comparison(A, B, margin=margin)
    d = np.subtract(A, B)
    p_low = scipy_stats.ttest_1samp(d, -margin, alternative="greater").pvalue
    p_high = scipy_stats.ttest_1samp(d, margin, alternative="less").pvalue
    assert c.p_equivalence == pytest.approx(max(p_low, p_high), rel=1e-9)


def test_tost_matches_statsmodels_ttost_paired():
    weightstats = pytest.importorskip("statsmodels.stats.weightstats")
    for margin in (0.01, 0.05, 0.2):
        c = paired_comparison(A, B, margin=margin)
        expected = weightstats.ttost_paired(np.array(A), np.array(B), -margin, margin)[0]
        assert c.p_equivalence == pytest.approx(expected, rel=1e-9)


def test_holm_matches_statsmodels_multipletests():
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    p = [0.01, 0.04, 0.03, 0.005, 0.2, 0.04]
    expected = multitest.multipletests(p, method="holm")[1]
    np.testing.assert_allclose(holm_adjust(p), expected, rtol=1e-12)


def test_holm_hand_worked_and_nan_left_out():
    # sorted 0.01, 0.02, 0.04 → 3·0.01, max(0.03, 2·0.02), max(0.04, 1·0.04); nan not counted.
    adjusted = holm_adjust([0.04, math.nan, 0.01, 0.02])
    assert math.isnan(adjusted[1])
    np.testing.assert_allclose([adjusted[0], adjusted[2], adjusted[3]], [0.04, 0.03, 0.04])


def test_four_outcomes():
    # higher: a clear positive shift with little spread.
    assert paired_comparison([1.0, 1.1, 1.2], [0.5, 0.62, 0.69], 0.01).outcome == "higher"
    assert paired_comparison([0.5, 0.62, 0.69], [1.0, 1.1, 1.2], 0.01).outcome == "lower"
    # equivalent: tiny spread around 0, margin 0.05.
    eq = paired_comparison([1.0, 1.001, 0.999, 1.0], [1.0, 1.0, 1.0, 1.0005], 0.05)
    assert eq.outcome == "equivalent"
    assert eq.describe() == "equivalent within ±0.05"
    # inconclusive: differences of both signs, wide spread, same margin.
    wide = paired_comparison([1.0, 1.2, 0.8], [1.1, 0.9, 1.0], 0.05)
    assert wide.outcome == "inconclusive"
    # no margin: never equivalent.
    assert paired_comparison([1.0, 1.001, 0.999], [1.0, 1.0, 1.0], None).outcome == ("inconclusive")


def test_describe_direction():
    c = paired_comparison([0.5, 0.62, 0.69], [1.0, 1.1, 1.2], 0.01)
    assert c.describe("lower") == "lower (better)"
    assert c.describe("higher") == "lower (worse)"
    assert c.describe() == "lower"


def test_holm_family_turns_a_single_significant_test_inconclusive():
    # p ≈ 0.03 alone is "higher"; among four tests its Holm p is ≥ 4 · 0.03 > 0.05.
    single = interval_comparison(0.1, 0.1 / scipy_stats.t.ppf(1 - 0.03 / 2, 4), 5, None)
    assert single.p_value == pytest.approx(0.03)
    assert single.outcome == "higher"
    others = [interval_comparison(0.0, 1.0, 5, None)] * 3
    adjusted = holm([single, *others])[0]
    assert adjusted.p_adjusted == pytest.approx(0.12)
    assert adjusted.outcome == "inconclusive"


def test_interval_comparison_from_a_published_mean_and_half_width():
    # Δ = +0.05 ± 0.12 over 3 seeds: se = 0.12 / t_{0.975,2}.
    se = 0.12 / scipy_stats.t.ppf(0.975, 2)
    c = interval_comparison(0.05, se, 3, 0.01)
    assert c.high - c.delta == pytest.approx(0.12)
    assert c.p_value == pytest.approx(2 * scipy_stats.t.sf(0.05 / se, 2))
    assert c.outcome == "inconclusive"


def test_zero_spread():
    same = paired_comparison([1.0, 2.0], [1.0, 2.0], 0.01)
    assert math.isnan(same.p_value) and same.p_equivalence == 0.0
    assert same.outcome == "equivalent"
    shifted = paired_comparison([1.5, 2.5], [1.0, 2.0], 0.01)
    assert shifted.p_value == 0.0 and shifted.outcome == "higher"


def test_bootstrap_comparison_percentile_p_values():
    # 100 replicates 0.00 … 0.99 shifted by −0.1: 11 are ≤ 0 (−0.10 … 0.00), 90 are ≥ 0.
    replicates = np.arange(100) / 100 - 0.1
    c = bootstrap_comparison(0.4, replicates, margin=0.5, n=3)
    assert c.p_value == pytest.approx(2 * 11 / 100)
    # P*(Δ* ≥ 0.5) = 40/100 (0.5 … 0.89), P*(Δ* ≤ −0.5) = 0.
    assert c.p_equivalence == pytest.approx(0.40)
    assert (c.low, c.high) == tuple(np.quantile(replicates, [0.025, 0.975]))
    assert c.n == 3 and c.outcome == "inconclusive"
    undefined = bootstrap_comparison(0.4, [0.1, math.nan, 0.3], margin=0.5)
    assert math.isnan(undefined.p_value) and math.isnan(undefined.low)
    assert undefined.outcome == "inconclusive"


def test_margins():
    assert default_margin("val_loss") == 0.01
    assert default_margin("task_accuracy/heldout/mean") == 0.01
    assert default_margin("tokens_per_s") is None
    assert default_margin("train_mean/balance_loss") is None  # not in nats
    assert default_margin("tokens_per_s", {"tokens_per_s": 50.0}) == 50.0


def test_judged_rows_holm_adjust_the_comparison_cells_of_a_table():
    a = paired_comparison([1.0, 1.1, 1.2], [0.5, 0.62, 0.69], 0.01)
    b = paired_comparison([1.0, 1.2, 0.8], [1.1, 0.9, 1.0], 0.01)
    rows = judged_rows([["x", a, "–"], ["y", "1.0", b]])
    adjusted = holm_adjust([a.p_value, b.p_value])
    assert rows[0][0] == "x" and rows[0][2] == "–" and rows[1][1] == "1.0"
    assert f"Holm {format_p(adjusted[0])}" in rows[0][1] and rows[0][1].endswith(": higher")
    assert f"Holm {format_p(adjusted[1])}" in rows[1][2] and rows[1][2].endswith(": inconclusive")
