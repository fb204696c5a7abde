"""The RoMA study configuration (DESIGN.md §5), loaded from TOML like a run config.

``load_roma_config("configs/roma.toml", ["k=5"])`` validates every field up front and raises
:class:`moealign.config.ConfigError` naming the field, the value given and what is accepted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from moealign.config import (
    MAX_BATCH,
    MAX_COEF,
    MAX_EXAMPLES,
    MAX_EXPERTS,
    MAX_LR,
    MAX_STEPS,
    ConfigError,
    _Validated,
    bounded,
    load_config,
)

REGULARIZERS = ("manifold", "l1", "l2", "entropy", "none")
NEIGHBOUR_MODES = ("knn", "epsilon", "random")
ENCODERS = ("minilm", "builtin")
TRAINED_METHODS = ("router_tuning", "roma", "oracle_tuning", "c3po", "c3po_ngd", "oracle")
DEFAULT_LAYERS = 5  # RoMA trains the routers of the last 5 MoE layers (DESIGN.md §5)


@dataclass
class RomaConfig(_Validated):
    """What ``moealign roma`` trains and evaluates.

    Routing vector r_i: the full routing softmax at ``token`` ("last" prompt token, or the
    "first") of the last ``layers`` MoE layers, concatenated: an integer n (at most the model's
    MoE layers), "all", or None (the default: the last 5, DESIGN.md §5, or all of them in a
    shallower model). Neighbours N(i) among the successful training samples, never i
    itself: the ``k`` nearest (``neighbours = "knn"``), those with kernel similarity
    exp(−‖e_i − e_j‖² / 2σ²) >= ``epsilon`` ("epsilon"), or ``k`` random ones ("random", an
    ablation); ``sigma`` is σ of the Gaussian kernel on the ``encoder``'s unit-norm embeddings.

    Router training: AdamW (``lr``, ``weight_decay``) for ``epochs`` over
    ``train_examples_per_task`` training examples per seen task (drawn per seed), batches of
    ``batch_size``; loss CE + λ(t)·R with λ(t) = ``lambda_max`` · min(1, t /
    ``lambda_warmup_steps``) and R the ``regularizer`` ("manifold" = RoMA; "none" = router
    tuning; "l1"/"l2"/"entropy" = ablations). C3PO kernel regression mixes with weight
    ``c3po_alpha`` on the sample's own routing; C3PO neighbourhood gradient descent takes plain
    gradient steps on the routing of the ``c3po_core_experts`` experts the sample weighs most
    per layer (C3PO: about 10 steps; 20 core experts of 64, the share 3 is of 8), with the
    step size and count chosen per seed among ``c3po_ngd_lrs`` × ``c3po_ngd_steps`` on
    ``c3po_ngd_validation_per_task`` seen-task validation questions per task; the oracle
    takes ``oracle_steps`` Adam steps of ``oracle_lr`` on the routing logits, and Oracle
    Tuning trains the routers toward the oracle routing of the training questions (with
    ``lr``, ``epochs``, ``batch_size``). Evaluation uses at most
    ``eval_examples_per_task`` examples per task.
    ``continuation``: options scored by their text's log-likelihood ("text") or by the
    next-token logit of their letter ("letter"; :mod:`moealign.roma.choices`). ``seeds``: one
    run per seed of every method but the base and the oracle. ``methods``: which of
    ``TRAINED_METHODS`` run (the base model is always evaluated, as the reference); an ablation
    that changes only RoMA runs ``methods = ["roma"]``. Oracle-gap closure and CTGI need the
    oracle.

    Defaults follow the paper where it states them (last 5 layers, Last1 token, kNN with
    k = 3). The rest are ours, sized to a CPU study, and differ from the released RoMA code
    (research-roma.md §1.2): σ = 0.5 on the Euclidean distance of unit embeddings (code: 0.4 on
    1 − cos), λ_max = 1 with 20 warm-up steps (code: 0.8 over 2000 steps), AdamW lr 1e-3 (code:
    7e-5), batches of 16 (code: 32), k = 3 (code: 5).

    Attributes:
        layers: MoE layers whose routing RoMA reads and trains: n, "all" or none (the last 5).
        token: the prompt token whose routing is used: last or first.
        continuation: options scored by their ``text`` or by their ``letter``.
        neighbours: how neighbours are chosen: knn, epsilon or random.
        k: neighbours per question (knn, random).
        epsilon: kernel similarity threshold of the epsilon neighbourhood.
        sigma: σ of the Gaussian kernel on the question embeddings.
        encoder: question embedder: minilm (all-MiniLM-L6-v2) or builtin (tests).
        regularizer: manifold (RoMA), l1, l2, entropy (ablations) or none (router tuning).
        lambda_max: λ after the warm-up.
        lambda_warmup_steps: steps of the linear λ warm-up.
        lr: AdamW learning rate of the routers.
        weight_decay: AdamW weight decay.
        epochs: passes over the training questions.
        batch_size: questions per router-training step.
        train_examples_per_task: training questions per seen task.
        eval_examples_per_task: evaluation questions per task at most.
        eval_batch_size: questions per evaluation batch.
        c3po_alpha: C3PO kernel regression: weight of the sample's own routing.
        c3po_ngd_lrs: C3PO neighbourhood gradient descent: candidate step sizes of its plain
            gradient steps (chosen per seed on validation questions).
        c3po_ngd_steps: C3PO neighbourhood gradient descent: candidate step counts.
        c3po_ngd_validation_per_task: seen-task validation questions per task that choose
            NGD's step size and count.
        c3po_core_experts: C3PO: experts per layer whose routing is optimised.
        oracle_steps: oracle routing: Adam steps on the routing logits.
        oracle_lr: oracle routing: step size.
        seeds: one run per seed of each trained method (distinct, at least one).
        methods: which methods run besides the base model (distinct, at least one).
        device: auto, cpu or cuda.
    """

    layers: int | Literal["all"] | None = None
    token: Literal["last", "first"] = "last"
    continuation: Literal["text", "letter"] = "text"
    neighbours: Literal["knn", "epsilon", "random"] = "knn"
    k: int = bounded(3, ge=1, le=1024)
    epsilon: float = bounded(0.5, gt=0, le=1)
    sigma: float = bounded(0.5, gt=0, le=1e3)
    encoder: Literal["minilm", "builtin"] = "minilm"
    regularizer: Literal["manifold", "l1", "l2", "entropy", "none"] = "manifold"
    lambda_max: float = bounded(1.0, ge=0, le=MAX_COEF)
    lambda_warmup_steps: int = bounded(20, ge=0, le=MAX_STEPS)
    lr: float = bounded(1e-3, gt=0, le=MAX_LR)
    weight_decay: float = bounded(0.01, ge=0, le=10)
    epochs: int = bounded(3, ge=1, le=10_000)
    batch_size: int = bounded(16, ge=1, le=MAX_BATCH)
    train_examples_per_task: int = bounded(100, ge=1, le=MAX_EXAMPLES)
    eval_examples_per_task: int = bounded(100, ge=1, le=MAX_EXAMPLES)
    eval_batch_size: int = bounded(64, ge=1, le=MAX_BATCH)
    c3po_alpha: float = bounded(0.5, ge=0, le=1)
    c3po_ngd_lrs: tuple[float, ...] = bounded((30.0, 300.0), gt=0, le=MAX_LR)
    c3po_ngd_steps: tuple[int, ...] = bounded((5, 10), ge=1, le=100_000)
    c3po_ngd_validation_per_task: int = bounded(10, ge=1, le=MAX_EXAMPLES)
    c3po_core_experts: int = bounded(3, ge=1, le=MAX_EXPERTS)
    oracle_steps: int = bounded(20, ge=1, le=100_000)
    oracle_lr: float = bounded(0.2, gt=0, le=MAX_LR)
    seeds: tuple[int, ...] = bounded((0, 1, 2), ge=0, lt=2**32)
    methods: tuple[
        Literal["router_tuning", "roma", "oracle_tuning", "c3po", "c3po_ngd", "oracle"], ...
    ] = TRAINED_METHODS
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.layers, int) and self.layers < 1:
            raise ConfigError("layers", f"got {self.layers!r}; expected an integer >= 1 or 'all'")
        if not self.seeds:
            raise ConfigError("seeds", "got (); expected at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError("seeds", f"got {self.seeds!r}; expected distinct seeds")
        for name in ("c3po_ngd_lrs", "c3po_ngd_steps"):
            if not getattr(self, name):
                raise ConfigError(name, "got (); expected at least one value")
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise ConfigError(
                "methods",
                f"got {self.methods!r}; expected distinct names among {TRAINED_METHODS}",
            )

    def layer_indices(self, n_moe_layers: int) -> list[int]:
        """The MoE layers (depth-order indices) whose routers RoMA reads and trains."""
        if n_moe_layers < 1:
            raise ValueError(f"n_moe_layers={n_moe_layers}; the model has no MoE layer")
        if isinstance(self.layers, int) and self.layers > n_moe_layers:
            raise ConfigError(
                "layers",
                f"got {self.layers}, but the base model has {n_moe_layers} MoE layers; expected "
                f"1 to {n_moe_layers} or 'all'",
            )
        if self.layers is None:
            count = min(DEFAULT_LAYERS, n_moe_layers)
        else:
            count = n_moe_layers if self.layers == "all" else self.layers
        return list(range(n_moe_layers - count, n_moe_layers))


def load_roma_config(path: str | Path | None = None, overrides: list[str] = ()) -> RomaConfig:
    """A :class:`RomaConfig` from a TOML file (None = defaults) plus ``key=value`` overrides."""
    return load_config(path, overrides, cls=RomaConfig)
