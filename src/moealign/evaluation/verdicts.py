"""Verdicts of a comparison: lower, higher, equivalent within ±m, or inconclusive.

A difference Δ = a − b (paired by seed, or bootstrap replicates of a statistic) gets one of four
outcomes (DESIGN.md §8):

* **lower** / **higher** — the difference test rejects Δ = 0 at level α (for a single test: the
  (1 − α) interval excludes 0);
* **equivalent within ±m** — otherwise, when the two one-sided tests (TOST; Schuirmann 1987)
  reject both Δ ≤ −m and Δ ≥ +m at level α, i.e. the (1 − 2α) interval lies inside (−m, +m).
  The margin m is stated per metric (:data:`DEFAULT_MARGINS`, or ``--margin METRIC=M``);
* **inconclusive** — neither: the data cannot tell an effect from no effect. A non-significant
  difference is never read as "no effect".

Paired t-test, d_i = a_i − b_i, s = sd(d) (ddof 1), se = s/√n, df = n − 1:

    p_diff = 2 · P(T_df > |d̄| / se),
    p_low = P(T_df > (d̄ + m)/se)   (H0: Δ ≤ −m),   p_high = P(T_df < (d̄ − m)/se)   (H0: Δ ≥ m),
    p_equiv = max(p_low, p_high).

From bootstrap replicates Δ*_r the same quantities are the percentile ones: p_diff =
min(1, 2 · min(P*(Δ* ≤ 0), P*(Δ* ≥ 0))), p_equiv = max(P*(Δ* ≤ −m), P*(Δ* ≥ m)), the interval
the (α/2, 1 − α/2) quantiles.

Where a table holds several tests, the decision uses Holm's step-down adjustment (Holm 1979) of
the difference p-values over the table's family, and of the equivalence p-values over the same
family: with the m finite p-values sorted ascending p_(1) ≤ … ≤ p_(m),

    p̃_(i) = min(1, max_{j ≤ i} (m − j + 1) · p_(j)),

which controls the family-wise error rate at α. Tables print the raw p beside the adjusted one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from scipy import stats as scipy_stats

from moealign.evaluation.stats import mean_confidence_interval
from moealign.tables import format_interval, format_number

__all__ = [
    "ALPHA",
    "DEFAULT_MARGINS",
    "Comparison",
    "Outcome",
    "bootstrap_comparison",
    "default_margin",
    "format_p",
    "holm",
    "holm_adjust",
    "interval_comparison",
    "judged_rows",
    "outcome_legend",
    "paired_comparison",
]

Outcome = Literal["lower", "higher", "equivalent", "inconclusive"]

ALPHA = 0.05

# Equivalence margins by metric-name part, first match wins: a language-model loss (nats per
# token) within ±0.01, an accuracy (a fraction) within ±0.01 = 1 point. Other metrics (balance
# loss, MaxVio, throughput, ...) get no equivalence test (lower / higher / inconclusive) unless
# one is given with --margin.
DEFAULT_MARGINS: tuple[tuple[str, float], ...] = (
    ("val_loss", 0.01),
    ("lm_loss", 0.01),
    ("accuracy", 0.01),
)


def outcome_legend(margins: Mapping[str, float] | None = None, defaults: bool = True) -> str:
    """A table note: how the outcomes are decided and the margins in use (``defaults``: the
    :data:`DEFAULT_MARGINS` by metric-name part, then ``margins``)."""
    stated = [f"{part}: ±{m:g}" for part, m in DEFAULT_MARGINS] if defaults else []
    stated += [f"{metric}: ±{m:g}" for metric, m in (margins or {}).items()]
    where = (
        " (metrics whose name contains the part; set with --margin METRIC=M); a metric without "
        "one cannot reach equivalent"
        if defaults
        else ""
    )
    return (
        "Outcome: lower / higher when the (Holm-adjusted, where a table holds several tests) "
        f"p < {ALPHA:g}; else equivalent within ±m when two one-sided tests (TOST, "
        "Holm-adjusted alike) put the difference inside ±m; else inconclusive (neither an "
        f"effect nor its absence is shown). Margins m: {'; '.join(stated)}{where}."
    )


def default_margin(metric: str, margins: Mapping[str, float] | None = None) -> float | None:
    """The equivalence margin of ``metric``: ``margins[metric]`` when given, else the first
    :data:`DEFAULT_MARGINS` entry whose name part ``metric`` contains, else None."""
    if margins and metric in margins:
        return margins[metric]
    return next((m for part, m in DEFAULT_MARGINS if part in metric.lower()), None)


@dataclass(frozen=True)
class Comparison:
    """Δ = a − b with its (1 − α) interval [low, high], the raw difference and TOST p-values,
    their Holm-adjusted values (equal to the raw ones for a single test) and the outcome.

    ``margin`` is None when no equivalence margin is set (then ``p_equivalence`` is nan and
    "equivalent" cannot be reached). A nan ``p_value`` (every difference 0) is left out of the
    Holm family.
    """

    delta: float
    low: float
    high: float
    n: int
    p_value: float
    p_equivalence: float
    margin: float | None
    p_adjusted: float
    p_equivalence_adjusted: float
    alpha: float = ALPHA
    family: int = 1  # the number of tests the p-values were Holm-adjusted over
    symmetric: bool = True  # a t interval Δ ± half width (a bootstrap one is [low, high])

    @property
    def outcome(self) -> Outcome:
        if self.p_adjusted < self.alpha:
            return "lower" if self.delta < 0 else "higher"
        if self.p_equivalence_adjusted < self.alpha:
            return "equivalent"
        return "inconclusive"

    def describe(self, direction: Literal["lower", "higher"] | None = None) -> str:
        """The outcome in words: ``lower (better)``, ``equivalent within ±0.01``,
        ``inconclusive`` … ``direction`` says which way is better, if either."""
        outcome = self.outcome
        if outcome == "equivalent":
            return f"equivalent within ±{self.margin:g}"
        if outcome == "inconclusive":
            return "inconclusive" + ("" if self.margin is not None else " (no margin set)")
        if direction is None:
            return outcome
        return f"{outcome} ({'better' if outcome == direction else 'worse'})"

    def to_dict(self) -> dict[str, float | int | str | None]:
        def number(value: float) -> float | None:
            return value if math.isfinite(value) else None

        return {
            "delta": self.delta,
            "low": number(self.low),
            "high": number(self.high),
            "n": self.n,
            "p_value": number(self.p_value),
            "p_adjusted": number(self.p_adjusted),
            "margin": self.margin,
            "p_equivalence": number(self.p_equivalence),
            "p_equivalence_adjusted": number(self.p_equivalence_adjusted),
            "outcome": self.outcome,
            "family": self.family,
        }

    def text(self, direction: Literal["lower", "higher"] | None = None) -> str:
        """``+0.012 ± 0.020 (p=0.030, Holm p=0.090, n=3): inconclusive`` — the interval, the
        raw p, the adjusted p where the family has several tests, n and the outcome."""
        if self.symmetric:
            interval = format_interval(self.delta, self.high - self.delta, signed=True)
        else:
            interval = (
                f"{format_number(self.delta, 3, signed=True)} "
                f"[{format_number(self.low, 3, signed=True)}, "
                f"{format_number(self.high, 3, signed=True)}]"
            )
        p_text = format_p(self.p_value)
        if self.family > 1:
            p_text += f", Holm {format_p(self.p_adjusted)}"
        return f"{interval} ({p_text}, n={self.n}): {self.describe(direction)}"


def _one_sided_t(statistic: float, df: int, upper: bool) -> float:
    """P(T_df > statistic) (``upper``) or P(T_df < statistic); ±inf statistics give 0 or 1."""
    return float(scipy_stats.t.sf(statistic, df) if upper else scipy_stats.t.cdf(statistic, df))


def interval_comparison(
    delta: float, standard_error: float, n: int, margin: float | None, alpha: float = ALPHA
) -> Comparison:
    """The t-based comparison from a mean difference, its standard error and the number of
    pairs n (df = n − 1; e.g. recomputed from a published mean ± half width). A zero standard
    error (every difference equal) makes each test certain: p 0 or 1 (p_value nan when Δ = 0)."""
    df = n - 1
    half_width = float(scipy_stats.t.ppf(1 - alpha / 2, df) * standard_error)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_zero = np.float64(delta) / standard_error
        t_low = np.float64(delta + (margin or 0.0)) / standard_error
        t_high = np.float64(delta - (margin or 0.0)) / standard_error
    p_value = math.nan if math.isnan(t_zero) else 2.0 * _one_sided_t(abs(float(t_zero)), df, True)
    p_equivalence = math.nan
    if margin is not None:
        # 0/0 (Δ exactly on a bound, no spread) is not inside the open margin: p = 1.
        p_equivalence = max(
            1.0 if math.isnan(t_low) else _one_sided_t(float(t_low), df, True),
            1.0 if math.isnan(t_high) else _one_sided_t(float(t_high), df, False),
        )
    return Comparison(
        delta=float(delta),
        low=float(delta - half_width),
        high=float(delta + half_width),
        n=n,
        p_value=p_value,
        p_equivalence=p_equivalence,
        margin=margin,
        p_adjusted=p_value,
        p_equivalence_adjusted=p_equivalence,
        alpha=alpha,
    )


def paired_comparison(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    margin: float | None,
    alpha: float = ALPHA,
) -> Comparison:
    """Paired t-test and TOST of a − b (e.g. two variants over the same seeds; module doc)."""
    a_N, b_N = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a_N.ndim != 1 or a_N.shape != b_N.shape or a_N.size < 2:
        raise ValueError(
            f"a and b must be paired samples of equal length >= 2, got shapes {a_N.shape} and "
            f"{b_N.shape}"
        )
    difference_N = a_N - b_N
    delta, _, n = mean_confidence_interval(difference_N, 1 - alpha)
    return interval_comparison(delta, difference_N.std(ddof=1) / math.sqrt(n), n, margin, alpha)


def bootstrap_comparison(
    estimate: float,
    replicates: Sequence[float] | np.ndarray,
    margin: float | None,
    alpha: float = ALPHA,
    n: int | None = None,
) -> Comparison:
    """The percentile-bootstrap comparison of ``estimate`` (Δ on the full data) from its
    replicates Δ*_r (module doc). ``n`` (default: the number of replicates) is recorded as the
    comparison's sample size, e.g. the number of seeds. A non-finite replicate (e.g. a resample
    that left a ratio 0/0) leaves the interval and the p-values undefined (nan): inconclusive,
    and out of the Holm family."""
    replicates_R = np.asarray(replicates, dtype=np.float64)
    if replicates_R.ndim != 1 or replicates_R.size == 0:
        raise ValueError(f"replicates must be a non-empty 1-D array, got {replicates_R.shape}")
    low = high = p_value = p_equivalence = math.nan
    if np.all(np.isfinite(replicates_R)):
        low, high = (float(q) for q in np.quantile(replicates_R, [alpha / 2, 1 - alpha / 2]))
        p_value = min(1.0, 2.0 * min(np.mean(replicates_R <= 0), np.mean(replicates_R >= 0)))
        if margin is not None:
            p_equivalence = max(np.mean(replicates_R <= -margin), np.mean(replicates_R >= margin))
    return Comparison(
        delta=float(estimate),
        low=low,
        high=high,
        n=replicates_R.size if n is None else n,
        p_value=float(p_value),
        p_equivalence=float(p_equivalence),
        margin=margin,
        p_adjusted=float(p_value),
        p_equivalence_adjusted=float(p_equivalence),
        alpha=alpha,
        symmetric=False,
    )


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values (module doc), in the input's order; nan entries stay nan
    and are not counted in the family."""
    p_P = np.asarray(p_values, dtype=np.float64)
    adjusted_P = np.full(p_P.shape, math.nan)
    finite = np.flatnonzero(np.isfinite(p_P))
    m = finite.size
    if m == 0:
        return adjusted_P.tolist()
    order = finite[np.argsort(p_P[finite], kind="stable")]
    scaled = (m - np.arange(m)) * p_P[order]
    adjusted_P[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return adjusted_P.tolist()


def holm(comparisons: Sequence[Comparison]) -> list[Comparison]:
    """The comparisons of one table as a family: their p-values Holm-adjusted (difference and
    equivalence each over the family), so each outcome is decided at family-wise level α."""
    adjusted = holm_adjust([c.p_value for c in comparisons])
    adjusted_equivalence = holm_adjust([c.p_equivalence for c in comparisons])
    family = sum(math.isfinite(c.p_value) for c in comparisons)
    return [
        replace(c, p_adjusted=p, p_equivalence_adjusted=q, family=family)
        for c, p, q in zip(comparisons, adjusted, adjusted_equivalence, strict=True)
    ]


def judged_rows(rows: Sequence[Sequence[object]]) -> list[list[object]]:
    """A table's rows with every :class:`Comparison` cell replaced by its text
    (:meth:`Comparison.text`), the table's comparisons Holm-adjusted as one family."""
    found = [(r, c) for r, row in enumerate(rows) for c, cell in enumerate(row)]
    found = [(r, c) for r, c in found if isinstance(rows[r][c], Comparison)]
    adjusted = holm([rows[r][c] for r, c in found])  # type: ignore[misc]
    judged = [list(row) for row in rows]
    for (r, c), comparison in zip(found, adjusted, strict=True):
        judged[r][c] = comparison.text()
    return judged


def format_p(p: float | None) -> str:
    """``p<0.001``, ``p=0.123`` or ``p=n/a``."""
    if p is None or not math.isfinite(p):
        return "p=n/a"
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"
