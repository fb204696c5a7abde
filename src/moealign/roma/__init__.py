"""RoMA: router-only post-training by routing manifold alignment, with the C3PO and oracle
routing baselines (DESIGN.md §5). Works on any :class:`moealign.nn.routed.RoutedModel`.

* :mod:`~moealign.roma.config`: :class:`RomaConfig` (``configs/roma.toml``);
* :mod:`~moealign.roma.choices`: multiple-choice scoring and routing capture;
* :mod:`~moealign.roma.encoders`: task-text encoders (MiniLM, a built-in one);
* :mod:`~moealign.roma.neighbours`: N(i) among successful samples, kernel weights W;
* :mod:`~moealign.roma.training`: router tuning / RoMA training and its regularisers;
* :mod:`~moealign.roma.baselines`: C3PO (kernel regression, neighbourhood gradient descent),
  oracle routing, Oracle Tuning;
* :mod:`~moealign.roma.study`: ``moealign roma``.
"""

from moealign.roma.baselines import (
    c3po_capture,
    c3po_ngd_capture,
    descend_core_routing,
    neighbour_mixture,
    oracle_capture,
    oracle_tuning,
)
from moealign.roma.choices import Capture, capture, encode_question, task_evaluation
from moealign.roma.config import RomaConfig, load_roma_config
from moealign.roma.encoders import HashedTrigramEncoder, MiniLMEncoder, TextEncoder, build_encoder
from moealign.roma.neighbours import Neighbourhood, find_neighbours
from moealign.roma.training import (
    RouterTrainingConfig,
    TrainingLog,
    lambda_at,
    manifold_loss,
    routing_entropy,
    train_routers,
)

__all__ = [
    "Capture",
    "HashedTrigramEncoder",
    "MiniLMEncoder",
    "Neighbourhood",
    "RomaConfig",
    "RouterTrainingConfig",
    "TextEncoder",
    "TrainingLog",
    "build_encoder",
    "c3po_capture",
    "c3po_ngd_capture",
    "capture",
    "descend_core_routing",
    "encode_question",
    "find_neighbours",
    "lambda_at",
    "load_roma_config",
    "manifold_loss",
    "neighbour_mixture",
    "oracle_capture",
    "oracle_tuning",
    "routing_entropy",
    "task_evaluation",
    "train_routers",
]
