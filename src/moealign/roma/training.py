"""Router-only post-training: router tuning and RoMA (DESIGN.md §5; RoMA Eqs. 7–10).

Only the routers of the chosen MoE layers are trained; every other tensor is frozen
(requires_grad=False for the duration). For a batch of questions i with routing vectors
r_i(θ) computed in the same forward pass (so every term has a gradient w.r.t. θ):

    L = mean_i CE_i + λ(t) · mean_i R_i,      λ(t) = λ_max · min(1, t / T_warm)

(without the CE term when ``task_loss`` is off: Oracle Tuning, :mod:`moealign.roma.baselines`)

with t the optimizer steps taken and the regulariser R (``regularizer``):

    manifold  R_i = Σ_{j∈N(i)} W_ij ‖r_i(θ) − r_j‖²     (RoMA; r_j fixed targets of the base model)
    entropy   R_i = Σ_l H(r_i,l(θ))                     (routing entropy per layer, minimised)
    l1        R   = Σ |θ − θ_0|                          (router weights' change from the base)
    l2        R   = Σ (θ − θ_0)²
    none      R   = 0                                    (router tuning)

optimised with AdamW. The l1/l2 penalties on θ − θ_0 (the routers' change from the base model)
are our reading of the RoMA paper's L1/L2 regulariser ablation, which does not say what they
act on. The frozen model runs in eval mode (no dropout, jitter or expert-bias
updates).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moealign.data.tasks import TaskExample
from moealign.data.tokenizer import Tokenizer
from moealign.nn.functional import plogp
from moealign.nn.routed import RoutedModel
from moealign.roma.choices import (
    ChoiceBatch,
    choice_loss,
    collate,
    encode_questions,
    frozen_eval,
    model_device,
    only_trainable,
    option_scores,
    routing_per_layer,
)
from moealign.roma.config import REGULARIZERS
from moealign.roma.neighbours import Neighbourhood


def manifold_loss(routing_BP: Tensor, targets_BKP: Tensor, weight_BK: Tensor) -> Tensor:
    """mean_b Σ_k W_bk ‖r_b − r_bk‖² (RoMA Eq. 7); padded neighbours carry weight 0."""
    distance2_BK = (routing_BP.unsqueeze(1) - targets_BKP).square().sum(-1)
    return (weight_BK * distance2_BK).sum(-1).mean()


def routing_entropy(routing_BLE: Tensor) -> Tensor:
    """mean_b Σ_l H(r_b,l), H(p) = −Σ_e p_e log p_e with 0·log 0 = 0 and finite gradients
    (:func:`moealign.nn.functional.plogp`)."""
    return -plogp(routing_BLE).sum(-1).sum(-1).mean()


def lambda_at(step: int, lambda_max: float, warmup_steps: int) -> float:
    """λ(t) = λ_max · min(1, t / T_warm) (λ_max at once when T_warm = 0)."""
    if warmup_steps == 0:
        return lambda_max
    return lambda_max * min(1.0, step / warmup_steps)


@dataclass
class RouterTrainingConfig:
    """The training knobs of :func:`train_routers` (a view of :class:`RomaConfig`);
    ``task_loss=False`` trains on λ(t)·R alone."""

    regularizer: str = "manifold"
    lambda_max: float = 1.0
    lambda_warmup_steps: int = 20
    lr: float = 1e-3
    weight_decay: float = 0.01
    epochs: int = 3
    batch_size: int = 16
    task_loss: bool = True


@dataclass
class TrainingLog:
    """Per optimizer step: the CE, the regulariser R and λ(t)."""

    ce: list[float]
    regularizer: list[float]
    lam: list[float]


def _regularizer(
    name: str,
    routing_BLE: Tensor,
    rows: Tensor,
    targets_NP: Tensor | None,
    neighbourhood: Neighbourhood | None,
    parameters: Sequence[nn.Parameter],
    initial: Sequence[Tensor],
) -> Tensor:
    if name == "manifold":
        index_BK = neighbourhood.index_QK[rows]
        sub = Neighbourhood(index_BK, neighbourhood.weight_QK[rows])
        targets_BKP = sub.gather(targets_NP).to(routing_BLE)
        return manifold_loss(routing_BLE.flatten(1), targets_BKP, sub.weight_QK.to(routing_BLE))
    if name == "entropy":
        return routing_entropy(routing_BLE)
    if name in ("l1", "l2"):
        power = 1 if name == "l1" else 2
        return sum(
            (p - p0).abs().pow(power).sum() for p, p0 in zip(parameters, initial, strict=True)
        )
    return routing_BLE.new_zeros(())


def train_routers(
    routed: RoutedModel,
    tokenizer: Tokenizer,
    examples: Sequence[TaskExample],
    layers: Sequence[int],
    config: RouterTrainingConfig,
    *,
    token: str = "last",
    continuation: str = "letter",
    targets_NP: Tensor | None = None,
    neighbourhood: Neighbourhood | None = None,
    seed: int = 0,
) -> TrainingLog:
    """Train the routers of ``layers`` in place on ``examples`` (see the module docstring).

    For ``regularizer="manifold"``, ``neighbourhood`` gives N(i) and W_ij per training example
    (rows of ``examples``) as indices into the rows of ``targets_NP``, the fixed routing vectors
    r_j of the references. ``token`` and ``continuation``: see :mod:`moealign.roma.choices`.
    ``seed`` fixes the batch order. Returns the per-step log.
    """
    if config.regularizer not in REGULARIZERS:
        raise ValueError(
            f"regularizer={config.regularizer!r} is not accepted; choose one of {REGULARIZERS}"
        )
    if config.regularizer == "manifold" and (targets_NP is None or neighbourhood is None):
        raise ValueError("regularizer='manifold' needs targets_NP and neighbourhood")
    if neighbourhood is not None and neighbourhood.index_QK.shape[0] != len(examples):
        raise ValueError(
            f"neighbourhood has {neighbourhood.index_QK.shape[0]} rows for {len(examples)} "
            "examples; expected one row per training example"
        )
    device = model_device(routed)
    parameters = routed.router_parameters(list(layers))
    if not parameters:
        raise ValueError(f"layers={list(layers)} hold no router parameters")
    questions = encode_questions(examples, tokenizer, token, continuation)
    if targets_NP is not None:
        targets_NP = targets_NP.to(device)
    if neighbourhood is not None:
        neighbourhood = Neighbourhood(
            neighbourhood.index_QK.to(device), neighbourhood.weight_QK.to(device)
        )
    initial = [p.detach().clone() for p in parameters]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    log = TrainingLog([], [], [])
    step = 0
    with frozen_eval(routed), only_trainable(routed, parameters):
        for _ in range(config.epochs):
            order = torch.randperm(len(questions), generator=generator)
            for start in range(0, len(order), config.batch_size):
                rows = order[start : start + config.batch_size]
                batch: ChoiceBatch = collate(
                    [questions[i] for i in rows.tolist()], tokenizer.pad_id
                ).to(device)
                output = routed.forward(batch.input_ids_RS)
                ce = choice_loss(option_scores(output, batch), batch.gold_B)
                routing_BLE = routing_per_layer(output, layers, batch)
                penalty = _regularizer(
                    config.regularizer,
                    routing_BLE,
                    rows.to(device),
                    targets_NP,
                    neighbourhood,
                    parameters,
                    initial,
                )
                lam = lambda_at(step, config.lambda_max, config.lambda_warmup_steps)
                loss = ce if config.task_loss else torch.zeros_like(ce)
                if config.regularizer != "none":
                    loss = loss + lam * penalty
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(f"the loss became {loss.item()} at step {step}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                log.ce.append(ce.item())
                log.regularizer.append(penalty.item())
                log.lam.append(lam)
    return log
