"""Single MoE layers compressed through moealign.compression, for the compression tests."""

from __future__ import annotations

import torch

from moealign.compression import (
    LayerCalibration,
    build_compressed,
    moe_layer_views,
    plan_layer,
)
from moealign.nn import MoELayer

D_MODEL, D_FF = 16, 12


def make_layer(n_experts: int = 6, top_k: int = 2, seed: int = 0, **options) -> MoELayer:
    """A random MoELayer (d_model 16, d_ff 12) in eval mode; ``options`` go to MoELayer."""
    torch.manual_seed(seed)
    return MoELayer(D_MODEL, D_FF, n_experts, top_k, **options).eval()


def calibration_inputs(n_tokens: int = 96, seed: int = 1) -> torch.Tensor:
    return torch.randn(n_tokens, D_MODEL, generator=torch.Generator().manual_seed(seed))


def layer_calibration(
    layer: MoELayer, x_TD: torch.Tensor, batch_tokens: list[int] | None = None
) -> LayerCalibration:
    (view,) = moe_layer_views(layer)
    return LayerCalibration(view, x_TD, batch_tokens or [x_TD.shape[0]])


def compress_layer(
    layer: MoELayer, method: str, keep_experts: int, x_TD: torch.Tensor, **options
) -> tuple[MoELayer, list[tuple[int, ...]]]:
    """The compressed layer and its groups, calibrated on ``x_TD``."""
    calibration = layer_calibration(layer, x_TD)
    plan = plan_layer(method, calibration, keep_experts, **options)
    return build_compressed(layer, [calibration.view], [plan]), plan.groups
