"""The retention report of ``moealign compress``: ratios worked by hand, rendered by
moealign.tables (the one table renderer)."""

from __future__ import annotations

import pytest

from moealign.compression.retention import retention, retention_table
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
