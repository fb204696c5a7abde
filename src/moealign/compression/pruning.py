"""Expert pruning: which E′ experts of a layer to keep (research-compression.md §4; router R1).

* **Frequency (F-prune)**: keep the E′ experts with the most top-k slots on the calibration
  tokens (f_e); ties go to the lower expert index.
* **NAEE (O-prune**, Lu et al. 2024, arXiv 2402.14800): keep the subset K, |K| = E′, whose
  routed output is closest to the unpruned layer's on the calibration tokens,
  L(K) = Σ_batches ‖Z − Z_K‖_F (the Frobenius norm per calibration batch, not squared, summed;
  float64), with Z_K the layer output when the dropped experts' logits are −∞ (softmax over
  the kept experts, top-k re-selected and renormalised: exactly the R1-sliced layer).
  The search is exhaustive over all C(E, E′) subsets when C(E, E′) ≤ ``exhaustive_limit``
  (1000 by default: every E ≤ 12; NAEE's own 8→6 and 8→4 need 28 and 70), and greedy beyond
  it: backward elimination, dropping at each step the expert whose removal raises L least
  (our choice; the NAEE code enumerates only). Inputs X come from the original model
  ("layerwise"; NAEE's "progressive" variant is not implemented). Ties keep the
  lexicographically first subset.

Each Z_K is computed from the cached per-expert outputs E_e(x_t) and the router logits, not by
re-running the block: Z_K = Σ_e g_te(K) E_e(x_t) is the block's output by definition.
"""

from __future__ import annotations

import itertools
import math

import torch

from moealign.compression.calibration import LayerCalibration

EXHAUSTIVE_LIMIT = 1000


def frequency_keep(calibration: LayerCalibration, keep_experts: int) -> list[int]:
    """The ``keep_experts`` most-routed experts (ascending index)."""
    counts = calibration.counts.tolist()
    order = sorted(range(len(counts)), key=lambda e: (-counts[e], e))
    return sorted(order[:keep_experts])


def reconstruction_error(
    calibration: LayerCalibration, keep: list[int], full_TD: torch.Tensor | None = None
) -> float:
    """L(K) = Σ_batches ‖Z − Z_K‖_F (float64) for the kept experts ``keep``; ``full_TD`` is Z
    when already computed."""
    keep_E = torch.zeros(calibration.view.n_experts, dtype=torch.bool)
    keep_E[keep] = True
    if full_TD is None:
        full_TD = calibration.routed_output()
    error_TD = full_TD.double() - calibration.routed_output(keep_E).double()
    chunks = error_TD.split(calibration.batch_tokens)
    return float(sum(torch.linalg.matrix_norm(chunk) for chunk in chunks))


def naee_keep(
    calibration: LayerCalibration, keep_experts: int, exhaustive_limit: int = EXHAUSTIVE_LIMIT
) -> list[int]:
    """The kept subset of least reconstruction error (module docstring), ascending."""
    n_experts = calibration.view.n_experts
    full_TD = calibration.routed_output()

    def error(keep: list[int] | tuple[int, ...]) -> float:
        return reconstruction_error(calibration, list(keep), full_TD)

    if math.comb(n_experts, keep_experts) <= exhaustive_limit:
        subsets = itertools.combinations(range(n_experts), keep_experts)
        return list(min(subsets, key=error))
    kept = list(range(n_experts))
    while len(kept) > keep_experts:
        candidates = [[e for e in kept if e != drop] for drop in kept]
        kept = min(candidates, key=error)
    return kept
