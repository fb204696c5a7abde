"""scripts/restate_claims.py: the paired differences of a Markdown table, re-tested."""

import importlib.util
import sys
from pathlib import Path

import pytest
from scipy import stats as scipy_stats

from moealign.evaluation.verdicts import holm_adjust

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "restate_claims.py"
spec = importlib.util.spec_from_file_location("restate_claims", SCRIPT)
restate_claims = importlib.util.module_from_spec(spec)
sys.modules["restate_claims"] = restate_claims  # dataclasses look their module up there
spec.loader.exec_module(restate_claims)

DOCUMENT = """# Study

## Loss

| optimizer | val loss | Δ MPI − softmax (paired) | ppl |
|---|---:|---:|---:|
| adamw | 2.0 ± 0.1 | +0.033 ± 0.065 (p=0.16), inconclusive | 7.5 ± 0.4 |
| muonh | 1.9 ± 0.1 | +0.052 ± 0.017, p = 0.01 | 6.7 ± 0.2 |
| adamh | 2.1 ± 0.1 | −0.002 ± 0.044 (p=0.85, n=2) | 8.7 ± 0.7 |
"""


def test_cells_are_re_tested_from_delta_and_half_width_with_holm_per_table(tmp_path):
    ((heading, rows),) = restate_claims.tables(DOCUMENT)
    assert heading == "Loss" and len(rows) == 4  # the header and three rows
    tests = restate_claims.table_tests(heading, rows, [("val loss", 0.01)], seeds=3)
    assert [(t.row, t.delta, t.half_width, t.n, t.margin) for t in tests] == [
        ("adamw", 0.033, 0.065, 3, 0.01),
        ("muonh", 0.052, 0.017, 3, 0.01),
        ("adamh", -0.002, 0.044, 2, 0.01),
    ]
    raw = [
        2
        * scipy_stats.t.sf(
            abs(t.delta) / (t.half_width / scipy_stats.t.ppf(0.975, t.n - 1)), t.n - 1
        )
        for t in tests
    ]
    assert [t.comparison.p_value for t in tests] == pytest.approx(raw)
    assert [t.comparison.p_adjusted for t in tests] == pytest.approx(holm_adjust(raw))
    assert [t.comparison.outcome for t in tests] == ["inconclusive", "higher", "inconclusive"]
    document = tmp_path / "study.md"
    document.write_text(DOCUMENT)
    text = restate_claims.report(document, [("val loss", 0.01)], seeds=3)
    assert "## Loss (3 differences, 3 with a p-value)" in text and "**higher**" in text
