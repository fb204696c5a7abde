"""RoMA: router-only post-training by routing manifold alignment, with the C3PO and oracle
routing baselines (DESIGN.md §5). Works on any :class:`moealign.nn.routed.RoutedModel`.

* :mod:`~moealign.roma.config`: :class:`RomaConfig` (``configs/roma.toml``);
* :mod:`~moealign.roma.choices`: multiple-choice scoring and routing capture;
* :mod:`~moealign.roma.encoders`: task-text encoders (MiniLM, a built-in one);
* :mod:`~moealign.roma.neighbours`: N(i) among successful samples, kernel weights W;
* :mod:`~moealign.roma.training`: router tuning / RoMA training and its regularisers;
* :mod:`~moealign.roma.baselines`: C3PO re-mixing, oracle routing;
* :mod:`~moealign.roma.study`: ``moealign roma``.
"""

from moealign.roma.baselines import c3po_capture, neighbour_mixture, oracle_capture
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
    "capture",
    "encode_question",
    "find_neighbours",
    "lambda_at",
    "load_roma_config",
    "manifold_loss",
    "neighbour_mixture",
    "oracle_capture",
    "routing_entropy",
    "task_evaluation",
    "train_routers",
]
