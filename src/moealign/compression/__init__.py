"""Expert pruning and merging for MoE models (research-compression.md; DESIGN.md §1).

Four methods reduce every MoE layer from E to E′ experts, calibrated on the original model's
routing of calibration tokens (:mod:`~moealign.compression.calibration`):

* ``frequency``: keep the E′ most-routed experts (:mod:`~moealign.compression.pruning`);
* ``naee``: keep the subset of least output reconstruction error, exhaustive or greedy
  (:mod:`~moealign.compression.pruning`);
* ``msmoe``: M-SMoE, group around dominant experts by router-logit similarity, align hidden
  units by permutation, frequency-weighted average (:mod:`~moealign.compression.msmoe`);
* ``submoe``: Sub-MoE, K-means on output similarity, joint SVD with a shared U and a
  frequency-weighted merge of the V blocks (:mod:`~moealign.compression.submoe`).

Pruning slices the router rows (R1); merging collapses each group's rows into one (R3)
(:mod:`~moealign.compression.plan`). The result is a model of the same class built from a config
with E′ experts (:mod:`~moealign.compression.apply`). ``moealign compress`` is the command line
(:mod:`~moealign.compression.command`).
"""

from moealign.compression.apply import build_compressed
from moealign.compression.calibration import LayerCalibration, calibrate, dense_gates
from moealign.compression.compress import (
    METHODS,
    CompressionResult,
    check_request,
    compress_model,
    plan_layer,
)
from moealign.compression.layers import (
    CompressionError,
    ExpertWeights,
    MoELayerView,
    moe_layer_views,
)
from moealign.compression.plan import LayerPlan

__all__ = [
    "METHODS",
    "CompressionError",
    "CompressionResult",
    "ExpertWeights",
    "LayerCalibration",
    "LayerPlan",
    "MoELayerView",
    "build_compressed",
    "calibrate",
    "check_request",
    "compress_model",
    "dense_gates",
    "moe_layer_views",
    "plan_layer",
]
