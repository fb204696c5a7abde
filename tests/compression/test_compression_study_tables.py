"""scripts/compression_study.py's tables: log-ratio retention intervals and the paired method
tests, Holm-adjusted per table, against scipy on hand-made retention ratios."""

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
from scipy import stats as scipy_stats

from moealign.evaluation.verdicts import format_p, holm_adjust

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "compression_study.py"
spec = importlib.util.spec_from_file_location("compression_study", SCRIPT)
study = importlib.util.module_from_spec(spec)
sys.modules["compression_study"] = study
spec.loader.exec_module(study)

# val loss retention per method and seed on the unaligned bases, E′ = 6; the other ratios 1.
LOSS = {
    "frequency": [1.20, 1.30, 1.25],
    "naee": [1.02, 1.05, 1.03],
    "msmoe": [1.10, 1.40, 1.15],
    "submoe": [1.21, 1.29, 1.26],
}


def _rows() -> list[dict]:
    return [
        {
            "variant": "unaligned",
            "seed": seed,
            "method": method,
            "keep": 6,
            "retention": {
                key: (ratios[seed] if key == "val_loss" else 1.0) for key, _ in study.RATIOS
            },
        }
        for method, ratios in LOSS.items()
        for seed in range(3)
    ]


def test_method_pairs_are_paired_log_ratio_tests_holm_adjusted_per_table():
    table = study.method_pairs_table(_rows(), "unaligned", 6)
    pairs = [(row[0], row[1]) for row in table.rows]
    assert len(pairs) == math.comb(len(LOSS), 2)
    raw = [scipy_stats.ttest_rel(np.log(LOSS[a]), np.log(LOSS[b])).pvalue for a, b in pairs]
    adjusted = holm_adjust(raw)  # the other ratios are all 1: no p, not in the family
    for row, p, q in zip(table.rows, raw, adjusted, strict=True):
        assert f"({format_p(p)}, Holm {format_p(q)}, n=3)" in row[3]
        assert row[5].endswith("equivalent within ±0.01")  # seen accuracy ratios all 1
    naee = next(row for row in table.rows if row[:2] == ["frequency", "naee"])
    assert naee[3].endswith(": higher")  # frequency keeps less of the loss than NAEE
    assert study.method_pairs_table(_rows(), "aligned", 6) is None


def test_retention_cells_are_log_ratio_intervals():
    table = study.retention_table(
        [r | {"compressed": {"params_total": 10}} for r in _rows()], "unaligned", [6]
    )
    naee = next(row for row in table.rows if row[0] == "naee")
    logs = np.log(LOSS["naee"])
    low, high = scipy_stats.t.interval(0.95, 2, loc=logs.mean(), scale=scipy_stats.sem(logs))
    expected = f"{math.exp(logs.mean()):.3g} [{math.exp(low):.3g}, {math.exp(high):.3g}]"
    assert naee[2] == expected  # "1.03 [0.996, 1.07]": the geometric mean, 3 digits
