"""The retention report of ``moealign compress``: ratios worked by hand, rendered by
moealign.tables (the one table renderer)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats

from moealign.compression.retention import ratio_interval, ratio_text, retention, retention_table
from moealign.evaluation.stats import mean_confidence_interval
from moealign.tables import to_text


def test_retention_ratios_and_table_by_hand():
    original = {"val_loss": 2.0, "task_accuracy_seen": 0.25, "params_total": 247_232}
    original |= {"task_accuracy_heldout": 0.0, "tokens_per_s": 10_000.0}
    compressed = {"val_loss": 2.5, "task_accuracy_seen": 0.2, "params_total": 148_416}
    compressed |= {"task_accuracy_heldout": 0.1, "tokens_per_s": 12_500.0}
    ratios = retention(original, compressed)
    # Hand-worked: 2.5 / 2 = 1.25, 0.2 / 0.25 = 0.8, 148,416 / 247,232 = 0.60031...; an original
    # of 0 (held-out accuracy) and a metric neither side has (perplexity) give no ratio.
    assert ratios["val_loss"] == pytest.approx(1.25, rel=1e-12)  # float division
    assert ratios["task_accuracy_seen"] == pytest.approx(0.8, rel=1e-12)
    assert ratios["params_total"] == pytest.approx(148_416 / 247_232, rel=1e-12)
    assert ratios["task_accuracy_heldout"] is None and ratios["val_perplexity"] is None

    table = retention_table({"original": original, "compressed": compressed, "retention": ratios})
    assert list(table.headers) == ["metric", "original", "compressed", "compressed/original"]
    rows = {row[0]: row[1:] for row in table.rows}
    assert rows["val loss"] == ["2", "2.5", "1.25"]
    assert rows["parameters (total)"] == ["247,232", "148,416", "0.6003"]
    assert rows["inference tokens/s"] == ["10,000", "12,500", "1.25"]
    assert rows["task accuracy (held out)"] == ["0", "0.1", "–"]
    assert rows["val perplexity"] == ["–", "–", "–"]
    lines = to_text(table).splitlines()
    assert lines[0].split() == ["metric", "original", "compressed", "compressed/original"]
    assert lines[1].replace(" ", "").strip("-") == ""  # the header rule
    assert len(lines) == 2 + 7  # one row per metric of the report


def test_ratio_interval_is_the_exponentiated_t_interval_of_the_log_ratio():
    ratios = [1.2, 3.5, 9.0]  # spread like the perplexity ratios of a destructive method
    logs = np.log(ratios)
    low, high = scipy.stats.t.interval(0.95, 2, loc=logs.mean(), scale=scipy.stats.sem(logs))
    mean, low_r, high_r = ratio_interval(ratios)
    assert mean == pytest.approx(math.exp(logs.mean()))  # the geometric mean
    assert (low_r, high_r) == (pytest.approx(math.exp(low)), pytest.approx(math.exp(high)))
    assert 0 < low_r < mean < high_r  # a t interval on the raw ratios reaches below 0 here
    raw_mean, raw_half, _ = mean_confidence_interval(ratios)
    assert raw_mean - raw_half < 0
    # × k and ÷ k are symmetric: inverting every ratio inverts the interval.
    inverse = ratio_interval([1 / r for r in ratios])
    assert inverse == (pytest.approx(1 / mean), pytest.approx(1 / high_r), pytest.approx(1 / low_r))


def test_ratio_text():
    assert ratio_text([1.0, 1.0]) == "1 [1, 1]"
    assert ratio_text([2.0]) == "2"
    assert ratio_text([None, 2.0, 2.0]).endswith("(n=2)")
    assert ratio_text([None]) == "–"
    with pytest.raises(ValueError, match="positive"):
        ratio_interval([1.0, -1.0])
