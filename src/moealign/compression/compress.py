"""Compress a MoE model to E′ experts per layer with one of four methods
(research-compression.md; :mod:`moealign.compression` lists them).

``compress_model(model, method, keep_experts, batches)`` checks the request, records the
calibration statistics of the original model on ``batches``, plans every layer and returns the
new model built from its compressed config (:mod:`moealign.compression.apply`) with the plan of
each layer. The original model is not changed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from torch import Tensor, nn

from moealign.compression.apply import build_compressed, router_mapping
from moealign.compression.calibration import LayerCalibration, calibrate
from moealign.compression.layers import CompressionError, MoELayerView, moe_layer_views
from moealign.compression.msmoe import msmoe_plan
from moealign.compression.plan import LayerPlan, prune_plan
from moealign.compression.pruning import frequency_keep, naee_keep
from moealign.compression.submoe import submoe_plan
from moealign.config import COMPRESSION_METHODS as METHODS

MERGING_METHODS = ("msmoe", "submoe")
ROUTER_NOTES = {
    "R1 slice": "pruned experts' router rows removed",
    "R2 share": "all router rows kept; each group's rows share its merged expert",
    "R3 collapse": "one averaged router row per group: a transformers MoE config needs one "
    "router row per expert (routing decisions change; R2 is not expressible there)",
}


@dataclass
class CompressionResult:
    """The compressed model, what was asked, and per MoE layer the original experts behind each
    new expert (``groups[l][g]``)."""

    model: nn.Module
    method: str
    n_experts: int
    keep_experts: int
    calibration_tokens: int
    groups: list[list[tuple[int, ...]]]
    router_update: str

    def summary(self) -> dict:
        """A JSON-ready record of the compression (no weights)."""
        return {
            "method": self.method,
            "n_experts": self.n_experts,
            "keep_experts": self.keep_experts,
            "router_update": self.router_update,
            "router_update_note": ROUTER_NOTES[self.router_update],
            "calibration_tokens": self.calibration_tokens,
            "groups": [[list(g) for g in layer] for layer in self.groups],
        }


def check_request(
    model: nn.Module, method: str, keep_experts: int, rank: int | None = None
) -> list[MoELayerView]:
    """The model's MoE layer views, after checking that ``method``, ``keep_experts`` and
    ``rank`` are accepted for it (CompressionError naming the argument otherwise). E′ = E is
    accepted (every method then returns the model unchanged)."""
    if method not in METHODS:
        raise CompressionError(f"method={method!r} is not accepted; choose one of {METHODS}")
    views = moe_layer_views(model)
    sizes = {view.n_experts for view in views}
    if len(sizes) != 1:
        raise CompressionError(f"the MoE layers have {sorted(sizes)} experts; expected one E")
    (n_experts,) = sizes
    top_k = max(view.top_k for view in views)
    if isinstance(keep_experts, bool) or not isinstance(keep_experts, int):
        raise CompressionError(f"keep_experts={keep_experts!r} is not accepted; expected an int")
    if not top_k <= keep_experts <= n_experts:
        raise CompressionError(
            f"keep_experts={keep_experts} is not accepted; expected top_k={top_k} <= "
            f"keep_experts <= n_experts={n_experts}"
        )
    if rank is not None and (method != "submoe" or isinstance(rank, bool) or rank < 1):
        raise CompressionError(
            f"rank={rank!r} is not accepted; expected None (full rank) or, for method "
            "'submoe' only, an integer >= 1"
        )
    return views


def plan_layer(
    method: str,
    calibration: LayerCalibration,
    keep_experts: int,
    *,
    seed: int = 0,
    rank: int | None = None,
) -> LayerPlan:
    """One layer's plan by ``method`` (the methods' modules give the equations)."""
    weights = calibration.view.weights
    if method == "frequency":
        return prune_plan(weights, frequency_keep(calibration, keep_experts))
    if method == "naee":
        return prune_plan(weights, naee_keep(calibration, keep_experts))
    if method == "msmoe":
        return msmoe_plan(calibration, keep_experts)
    if method == "submoe":
        return submoe_plan(calibration, keep_experts, seed=seed, rank=rank)
    raise CompressionError(f"method={method!r} is not accepted; choose one of {METHODS}")


def compress_model(
    model: nn.Module,
    method: str,
    keep_experts: int,
    batches: Iterable[Mapping[str, Tensor]],
    *,
    seed: int = 0,
    rank: int | None = None,
    collapse: bool = False,
) -> CompressionResult:
    """Compress every MoE layer of ``model`` (a MoETransformer or a softmax-family transformers
    MoE model; for a lone MoELayer, build a :class:`LayerCalibration` from its inputs and use
    :func:`plan_layer` and :func:`build_compressed`) to ``keep_experts`` experts by ``method``,
    calibrated on ``batches`` (dicts with ``input_ids`` and optionally ``attention_mask``).
    ``seed`` seeds Sub-MoE's K-means; ``rank`` truncates Sub-MoE's joint SVD (None = the
    default truncation, :func:`moealign.compression.submoe.default_rank`); ``collapse`` merges
    with R3 (one collapsed router row per group) instead of R2 on a moealign model
    (:func:`moealign.compression.apply.router_mapping`)."""
    views = check_request(model, method, keep_experts, rank)
    calibrations = calibrate(model, batches)
    plans = [
        plan_layer(method, calibration, keep_experts, seed=seed, rank=rank)
        for calibration in calibrations
    ]
    return CompressionResult(
        router_update=router_mapping(model, plans, collapse),
        model=build_compressed(model, views, plans, collapse),
        method=method,
        n_experts=views[0].n_experts,
        keep_experts=keep_experts,
        calibration_tokens=calibrations[0].n_tokens,
        groups=[plan.groups for plan in plans],
    )
