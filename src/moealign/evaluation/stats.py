"""Statistics for result tables: t intervals over seeds, paired t-tests, paired bootstrap.

DESIGN.md §7–8: results over several seeds are reported as mean ± 95% Student-t half width;
two methods run on the same seeds are compared with a paired t-test; per-example metrics of two
systems on the same examples get a paired bootstrap percentile interval; per-example metrics
over several seeds get a hierarchical (two-level) bootstrap, so that the interval holds both
the seed-to-seed and the example-sampling variance (:func:`hierarchical_bootstrap_means`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
from scipy import stats as scipy_stats

from moealign.tables import format_interval

# Resampled index arrays are drawn in chunks of at most this many elements (64 MiB of int64).
_MAX_INDEX_ELEMENTS = 1 << 23


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")


def _as_1d(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    values_N = np.asarray(values, dtype=np.float64)
    if values_N.ndim != 1 or values_N.size == 0:
        raise ValueError(
            f"{name} must be a non-empty 1-D sequence of numbers, got shape {values_N.shape}"
        )
    return values_N


def mean_confidence_interval(
    values: Sequence[float] | np.ndarray, confidence: float = 0.95
) -> tuple[float, float, int]:
    """Mean and Student-t confidence half width: (mean, half_width, n).

    half_width = t_{(1+c)/2, n−1} · s / √n with s the sample standard deviation (ddof = 1).
    With a single value the spread is unknown and half_width is ``nan``.
    """
    _check_confidence(confidence)
    values_N = _as_1d(values, "values")
    n = values_N.size
    mean = float(values_N.mean())
    if n == 1:
        return mean, float("nan"), 1
    standard_error = values_N.std(ddof=1) / np.sqrt(n)
    half_width = float(scipy_stats.t.ppf((1.0 + confidence) / 2.0, n - 1) * standard_error)
    return mean, half_width, n


def interval_text(values: Sequence[float | None]) -> str:
    """``mean ± half width`` (:func:`mean_confidence_interval`) of the finite values, written by
    :func:`moealign.tables.format_interval` (precision from the half width); the mean alone for
    one value, ``–`` for none; ``(n=k)`` is appended when some values are missing (None or not
    finite)."""
    finite = [v for v in values if v is not None and np.isfinite(v)]
    if not finite:
        return "–"
    mean, half_width, n = mean_confidence_interval(finite)
    return format_interval(mean, half_width) + (f" (n={n})" if n != len(values) else "")


def paired_t_test(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, confidence: float = 0.95
) -> tuple[float, float, float]:
    """Paired t-test of a against b (e.g. two methods over the same seeds).

    With d_i = a_i − b_i: returns (mean d, Student-t half width of mean d, two-sided p-value),
    t = mean(d) / (s_d / √n), p = 2 · P(T_{n−1} > |t|). When every d_i is equal, t is infinite
    (p = 0) if mean d ≠ 0 and undefined (p = nan) if mean d = 0.
    """
    a_N, b_N = _as_1d(a, "a"), _as_1d(b, "b")
    if a_N.size != b_N.size or a_N.size < 2:
        raise ValueError(
            f"a and b must be paired samples of equal length >= 2, got lengths {a_N.size} and "
            f"{b_N.size}"
        )
    difference_N = a_N - b_N
    mean_difference, half_width, n = mean_confidence_interval(difference_N, confidence)
    standard_error = difference_N.std(ddof=1) / np.sqrt(n)
    if standard_error == 0.0:
        p_value = float("nan") if mean_difference == 0.0 else 0.0
    else:
        t_statistic = mean_difference / standard_error
        p_value = float(2.0 * scipy_stats.t.sf(abs(t_statistic), n - 1))
    return mean_difference, half_width, p_value


def bootstrap_indices(
    n_examples: int, n_resamples: int, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """Yield index arrays (R_chunk, n_examples) of draws with replacement, n_resamples rows in all.

    Chunked so memory stays bounded for large evaluation sets (e.g. MMLU's 14k items).
    """
    if n_examples <= 0 or n_resamples <= 0:
        raise ValueError(
            f"n_examples and n_resamples must be positive, got {n_examples} and {n_resamples}"
        )
    chunk = max(1, _MAX_INDEX_ELEMENTS // n_examples)
    for start in range(0, n_resamples, chunk):
        yield rng.integers(0, n_examples, size=(min(chunk, n_resamples - start), n_examples))


def seed_bootstrap_indices(n_seeds: int, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(R, S) seed indices drawn with replacement, the first level of
    :func:`hierarchical_bootstrap_means` (shared by every task of one replicate, since a seed
    is one run for all of them). With one seed nothing is drawn: every index is 0."""
    if n_seeds == 1:
        return np.zeros((n_resamples, 1), dtype=np.int64)
    return rng.integers(0, n_seeds, size=(n_resamples, n_seeds))


def hierarchical_bootstrap_means(
    scores_KSN: np.ndarray,
    seeds_RS: np.ndarray,
    rng: np.random.Generator,
    shared_examples: bool = False,
) -> np.ndarray:
    """Bootstrap replicates (R, K) of the mean score of K paired systems (e.g. model, baseline,
    oracle) over S seeds × N examples: replicate r takes the seeds ``seeds_RS[r]`` (drawn with
    :func:`seed_bootstrap_indices`) and, for each drawn seed, N examples with replacement, the
    same examples for all K systems (paired), and averages over the S · N draws.

    Nested (``shared_examples`` False; Davison & Hinkley 1997 §3.8, resampling both stages):
    each drawn seed gets its own example draw — for seeds that evaluated different examples.
    Var*(mean) = σ²_seed / S + mean_s σ²_s / (S·N) (σ²_seed: variance of the seed means,
    σ²_s: the variance within seed s; population variances).

    Crossed (``shared_examples`` True): one example draw per replicate serves every seed — for
    seeds that answered the same examples, where an example's difficulty is shared by all
    seeds; Var*(mean) = σ²_seed / S + σ²_example / N + σ²_interaction / (S·N) (two-way
    decomposition). Drawing the examples per seed there would divide the example variance by
    S · N instead of N and make the interval too narrow.

    With S = 1 both reduce to the plain example bootstrap (the draws of
    :func:`bootstrap_indices`). Memory is bounded by drawing replicates in chunks.
    """
    n_systems, n_seeds, n_examples = scores_KSN.shape
    n_resamples = seeds_RS.shape[0]
    chunk = max(1, _MAX_INDEX_ELEMENTS // (n_seeds * n_examples))
    means_RK = np.empty((n_resamples, n_systems))
    for start in range(0, n_resamples, chunk):
        seeds_rS = seeds_RS[start : start + chunk]
        size = (len(seeds_rS), 1 if shared_examples else n_seeds, n_examples)
        examples_rSN = rng.integers(0, n_examples, size=size)
        drawn_KrSN = scores_KSN[:, seeds_rS[:, :, None], examples_rSN]
        means_RK[start : start + len(seeds_rS)] = drawn_KrSN.mean(axis=(2, 3)).T
    return means_RK


def percentile_interval(replicates: np.ndarray, confidence: float) -> tuple[float, float]:
    """Percentile bootstrap interval: the (1−c)/2 and (1+c)/2 quantiles of the replicates."""
    _check_confidence(confidence)
    low, high = np.quantile(replicates, [(1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0])
    return float(low), float(high)


def paired_bootstrap_ci(
    per_example_a: Sequence[float] | np.ndarray,
    per_example_b: Sequence[float] | np.ndarray,
    statistic: Callable[[np.ndarray, np.ndarray], float],
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Paired percentile bootstrap of ``statistic(a, b)``: (estimate, ci_low, ci_high).

    Each resample draws n example indices with replacement and applies the same indices to both
    systems, so per-example correlation between a and b is kept. ``estimate`` is the statistic
    on the full data, e.g. ``statistic = lambda a, b: a.mean() - b.mean()``.
    """
    _check_confidence(confidence)
    a_N = _as_1d(per_example_a, "per_example_a")
    b_N = _as_1d(per_example_b, "per_example_b")
    if a_N.size != b_N.size:
        raise ValueError(
            f"per_example_a and per_example_b must score the same examples, got lengths "
            f"{a_N.size} and {b_N.size}"
        )
    rng = np.random.default_rng(seed)
    replicates = np.array(
        [
            statistic(a_N[index_N], b_N[index_N])
            for index_RN in bootstrap_indices(a_N.size, n_resamples, rng)
            for index_N in index_RN
        ],
        dtype=np.float64,
    )
    low, high = percentile_interval(replicates, confidence)
    return float(statistic(a_N, b_N)), low, high
