"""The routing baselines of RoMA (DESIGN.md §5; research-roma.md §1.5, §4.1).

Test-time methods change only the routing of the chosen layers at the routed token
(:meth:`moealign.nn.routed.RoutedModel.override_routing`), never a weight:

* C3PO kernel regression (arXiv 2504.07964; its released code): for a test question q with
  neighbours N(q) among the successful training samples and kernel weights W_qj (normalised
  over N(q), :mod:`moealign.roma.neighbours`), per layer l

      r_q,l ← α r_q,l + (1 − α) Σ_{j∈N(q)} W_qj r_j,l

  (a convex mixture of distributions, so it stays one).
* C3PO neighbourhood gradient descent (NGD, the paper's best surrogate): ``steps`` descent
  steps on q's routing ω at the routed token of the chosen ("critical") layers, minimising the
  kernel-weighted loss of its successful neighbours answered with q's routing,

      L_q(ω) = Σ_{j∈N(q)} W_qj · CE(f(x_j; ω), y_j),

  restricted to the "core experts": per layer, the ``core_experts`` experts with the largest
  weight in q's own routing r_q. Our reading of the restriction (:func:`descend_core_routing`):
  the other experts keep their weights exactly and the core experts share their own total mass
  m = Σ_core r_q,e as ω_core = m · softmax(z_core) with z = log r_q at the start (C3PO: last 5
  of 16 layers, top-20 of 64 experts, about 10 steps). The steps are plain gradient descent,
  z ← z − η ∇_z L_q, as C3PO describes NGD: the kernel weights and the gradient's size set the
  step (an adaptive optimiser such as Adam would rescale each coordinate and undo both). The
  study chooses η and the step count on seen-task validation questions
  (:func:`moealign.roma.study.RomaStudy`; ``c3po_ngd_lrs`` × ``c3po_ngd_steps``).
* Oracle routing: per question, a descent on all experts' logits with the question's own label
  (L = CE(f(x_q; ω), y_q)), with Adam steps (the paper does not say how its oracle was
  computed; Adam reaches the per-question optimum in few steps): the upper bound of what
  routing alone can reach.

A question without neighbours keeps its routing under both C3PO variants.

Oracle Tuning (a trained baseline of the RoMA paper, :func:`oracle_tuning`) fine-tunes the
routers toward the oracle routing r_i* of the training questions: L = mean_i ‖r_i(θ) − r_i*‖²
over the chosen routers (:mod:`moealign.roma.training`), the regression alone. That is our
reading: the paper says "fine-tune routers toward oracle routing weights" and not how
(research-roma.md §1.5, §6). Its inference costs what the base model's does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from moealign.data.tasks import TaskExample
from moealign.data.tokenizer import Tokenizer
from moealign.nn.routed import RoutedModel
from moealign.roma.choices import (
    Capture,
    CaptureBuilder,
    ChoiceBatch,
    batches,
    capture,
    collate,
    encode_questions,
    frozen_eval,
    model_device,
    only_trainable,
    option_scores,
    replace_at_positions,
    routing_per_layer,
)
from moealign.roma.neighbours import Neighbourhood
from moealign.roma.training import RouterTrainingConfig, TrainingLog, train_routers

# Floor of the probabilities whose log initialises the routing logits of a descent.
_LOG_FLOOR = 1e-12


def neighbour_mixture(neighbourhood: Neighbourhood, references_NP: Tensor) -> Tensor:
    """Σ_j W_qj r_j per query, (Q, P); zero for a query without neighbours."""
    return (neighbourhood.weight_QK.unsqueeze(-1) * neighbourhood.gather(references_NP)).sum(1)


def c3po_capture(
    routed: RoutedModel,
    tokenizer: Tokenizer,
    examples: Sequence[TaskExample],
    layers: Sequence[int],
    neighbourhood: Neighbourhood,
    references_NP: Tensor,
    alpha: float,
    token: str = "last",
    continuation: str = "letter",
    batch_size: int = 64,
) -> Capture:
    """Evaluate ``examples`` with C3PO re-mixing (module docstring); ``neighbourhood`` rows are
    the examples, its indices rows of ``references_NP`` (the references' routing vectors)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha!r} is not accepted; expected 0 <= alpha <= 1")
    if neighbourhood.index_QK.shape[0] != len(examples):
        raise ValueError(
            f"neighbourhood has {neighbourhood.index_QK.shape[0]} rows for {len(examples)} "
            "examples; expected one row per example"
        )
    n_layers = len(layers)
    mixture_QLE = neighbour_mixture(neighbourhood, references_NP).view(len(examples), n_layers, -1)
    has_neighbours_Q = neighbourhood.weight_QK.sum(-1) > 0

    def overrides_for(rows: range, batch: ChoiceBatch) -> dict:
        device = batch.gold_B.device
        question_R = batch.question_R
        mixture_RLE = mixture_QLE[rows.start : rows.stop].to(device)[question_R]
        has_R1 = has_neighbours_Q[rows.start : rows.stop].to(device)[question_R].unsqueeze(-1)

        def remix(slot: int):
            def new_probs(current_RE: Tensor) -> Tensor:
                mixed_RE = alpha * current_RE + (1.0 - alpha) * mixture_RLE[:, slot].to(current_RE)
                return torch.where(has_R1, mixed_RE, current_RE)

            return replace_at_positions(batch, new_probs)

        return {layer: remix(slot) for slot, layer in enumerate(layers)}

    return capture(
        routed, tokenizer, examples, layers, token, continuation, batch_size, overrides_for
    )


def _fixed_overrides(
    layers: Sequence[int], batch: ChoiceBatch, routing_BLE: Tensor
) -> dict[int, object]:
    """Overrides routing question b's rows at its routed token by ``routing_BLE[b]``."""
    routing_RLE = routing_BLE[batch.question_R]

    def fixed(slot: int):
        return replace_at_positions(batch, lambda _: routing_RLE[:, slot])

    return {layer: fixed(slot) for slot, layer in enumerate(layers)}


def _check_descent(steps: int, lr: float) -> None:
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps={steps!r} is not accepted; expected an integer >= 1")
    if not lr > 0:
        raise ValueError(f"lr={lr!r} is not accepted; expected a float > 0")


DESCENT_OPTIMIZERS = ("gd", "adam")


def descend_core_routing(
    own_BLE: Tensor,
    loss_fn: Callable[[Tensor], Tensor],
    steps: int,
    lr: float,
    core_experts: int | None = None,
    optimizer: str = "gd",
) -> Tensor:
    """``steps`` descent steps (learning rate ``lr``) on routing distributions ω (B, L, E) from
    the model's own ``own_BLE``, minimising ``loss_fn(ω)``; returns ω (no gradient).

    ``optimizer``: "gd" (plain gradient descent z ← z − lr·∇_z L, C3PO's NGD; scaling L by c
    scales every step by c) or "adam" (``torch.optim.Adam``, the oracle's).

    Core restriction (C3PO; None = every expert, the oracle's plain descent): per row, the
    ``core_experts`` largest entries of ``own_BLE`` form the core C, ω_e = own_e outside C, and
    ω_C = (Σ_C own) · softmax(z_C) with trainable logits z = log own (floored at 1e-12) at the
    start. Rows are independent when ``loss_fn`` sums per-row losses.
    """
    _check_descent(steps, lr)
    if optimizer not in DESCENT_OPTIMIZERS:
        raise ValueError(
            f"optimizer={optimizer!r} is not accepted; choose one of {DESCENT_OPTIMIZERS}"
        )
    n_experts = own_BLE.shape[-1]
    core = n_experts if core_experts is None else min(core_experts, n_experts)
    if core < 1:
        raise ValueError(f"core_experts={core_experts!r} is not accepted; expected >= 1")
    own_BLE = own_BLE.detach()
    core_BLE = torch.zeros_like(own_BLE, dtype=torch.bool)
    core_BLE.scatter_(-1, own_BLE.topk(core, dim=-1).indices, True)
    mass_BL1 = (own_BLE * core_BLE).sum(-1, keepdim=True)
    logits_BLE = own_BLE.clamp_min(_LOG_FLOOR).log().requires_grad_(True)

    def routing() -> Tensor:
        inside_BLE = logits_BLE.masked_fill(~core_BLE, -torch.inf).softmax(-1) * mass_BL1
        return torch.where(core_BLE, inside_BLE, own_BLE)

    adam = torch.optim.Adam([logits_BLE], lr=lr) if optimizer == "adam" else None
    for _ in range(steps):
        (gradient_BLE,) = torch.autograd.grad(loss_fn(routing()), [logits_BLE])
        if adam is None:
            with torch.no_grad():
                logits_BLE -= lr * gradient_BLE
        else:
            logits_BLE.grad = gradient_BLE
            adam.step()
    with torch.no_grad():
        return routing()


def _per_question_ce(routed: RoutedModel, batch: ChoiceBatch, overrides: dict) -> Tensor:
    """CE over the options of each question of ``batch``, answered under ``overrides``."""
    with routed.override_routing(overrides):
        output = routed.forward(batch.input_ids_RS)
    return F.cross_entropy(option_scores(output, batch), batch.gold_B, reduction="none")


def _own_routing(routed: RoutedModel, batch: ChoiceBatch, layers: Sequence[int]) -> Tensor:
    with torch.no_grad():
        return routing_per_layer(routed.forward(batch.input_ids_RS), layers, batch)


def _answer_with(
    routed: RoutedModel,
    batch: ChoiceBatch,
    layers: Sequence[int],
    routing_BLE: Tensor,
    result: CaptureBuilder,
) -> None:
    """Add ``batch``'s answers, each question routed by its row of ``routing_BLE``."""
    with torch.no_grad(), routed.override_routing(_fixed_overrides(layers, batch, routing_BLE)):
        result.add(routed.forward(batch.input_ids_RS), batch, layers)


def oracle_capture(
    routed: RoutedModel,
    tokenizer: Tokenizer,
    examples: Sequence[TaskExample],
    layers: Sequence[int],
    steps: int,
    lr: float,
    token: str = "last",
    continuation: str = "letter",
    batch_size: int = 64,
) -> Capture:
    """Oracle routing (module docstring): ``steps`` Adam steps of learning rate ``lr`` per
    question on its routing logits, using its label; then predict with the final routing.

    Questions in a batch are optimised together (the summed CE gives each question's logits
    exactly its own gradient); no model weight is touched.
    """
    _check_descent(steps, lr)
    questions = encode_questions(examples, tokenizer, token, continuation)
    device = model_device(routed)
    result = CaptureBuilder()
    with frozen_eval(routed), only_trainable(routed, []):
        for _, batch in batches(questions, batch_size, tokenizer.pad_id, device):
            routing_BLE = descend_core_routing(
                _own_routing(routed, batch, layers),
                lambda r, batch=batch: _per_question_ce(
                    routed, batch, _fixed_overrides(layers, batch, r)
                ).sum(),
                steps,
                lr,
                optimizer="adam",
            )
            _answer_with(routed, batch, layers, routing_BLE, result)
    return result.build()


def c3po_ngd_capture(
    routed: RoutedModel,
    tokenizer: Tokenizer,
    examples: Sequence[TaskExample],
    layers: Sequence[int],
    neighbourhood: Neighbourhood,
    references: Sequence[TaskExample],
    steps: int,
    lr: float,
    core_experts: int | None,
    token: str = "last",
    continuation: str = "letter",
    batch_size: int = 64,
) -> Capture:
    """Evaluate ``examples`` with C3PO neighbourhood gradient descent (module docstring):
    ``steps`` plain gradient steps of size ``lr`` on the core experts' routing logits.

    ``neighbourhood`` rows are the examples, its indices rows of ``references`` (the successful
    training questions, with their labels) and its weights W_qj. Each batch of test questions
    descends together with all its (question, neighbour) pairs in one batch: the loss sums
    W_qj · CE_j, so each question's routing gets exactly its own gradient. No weight changes.
    """
    if neighbourhood.index_QK.shape[0] != len(examples):
        raise ValueError(
            f"neighbourhood has {neighbourhood.index_QK.shape[0]} rows for {len(examples)} "
            "examples; expected one row per example"
        )
    questions = encode_questions(examples, tokenizer, token, continuation)
    neighbours = encode_questions(references, tokenizer, token, continuation)
    device = model_device(routed)
    result = CaptureBuilder()
    with frozen_eval(routed), only_trainable(routed, []):
        for rows, batch in batches(questions, batch_size, tokenizer.pad_id, device):
            own_BLE = _own_routing(routed, batch, layers)
            index_BK = neighbourhood.index_QK[rows.start : rows.stop]
            weight_BK = neighbourhood.weight_QK[rows.start : rows.stop]
            owner_N, slot_N = ((index_BK >= 0) & (weight_BK > 0)).nonzero(as_tuple=True)
            routing_BLE = own_BLE
            if owner_N.numel():
                pairs = collate(
                    [neighbours[j] for j in index_BK[owner_N, slot_N].tolist()], tokenizer.pad_id
                ).to(device)
                pair_weight_N = weight_BK[owner_N, slot_N].to(device)
                owner_N = owner_N.to(device)

                def neighbour_loss(routing: Tensor, pairs=pairs, w=pair_weight_N, o=owner_N):
                    ce_N = _per_question_ce(
                        routed, pairs, _fixed_overrides(layers, pairs, routing[o])
                    )
                    return (w * ce_N).sum()

                descended_BLE = descend_core_routing(
                    own_BLE, neighbour_loss, steps, lr, core_experts
                )
                has_B11 = torch.zeros(len(rows), 1, 1, dtype=torch.bool, device=device)
                has_B11[owner_N] = True
                routing_BLE = torch.where(has_B11, descended_BLE, own_BLE)
            _answer_with(routed, batch, layers, routing_BLE, result)
    return result.build()


def oracle_tuning(
    routed: RoutedModel,
    tokenizer: Tokenizer,
    examples: Sequence[TaskExample],
    layers: Sequence[int],
    oracle_routing_NP: Tensor,
    config: RouterTrainingConfig,
    *,
    token: str = "last",
    continuation: str = "letter",
    seed: int = 0,
) -> TrainingLog:
    """Oracle Tuning (module docstring): train the routers of ``layers`` in place so that each
    training example's routing vector r_i(θ) approaches its oracle routing r_i* (row i of
    ``oracle_routing_NP``, e.g. :func:`oracle_capture`'s ``routing_NP``):
    L = mean_i ‖r_i(θ) − r_i*‖², with ``config``'s optimizer, epochs and batches (its
    regulariser, λ and warm-up are replaced: λ = 1 from the first step, no CE term)."""
    if oracle_routing_NP.shape[0] != len(examples):
        raise ValueError(
            f"oracle_routing_NP has {oracle_routing_NP.shape[0]} rows for {len(examples)} "
            "examples; expected one row per example"
        )
    n = len(examples)
    # Each example's one "neighbour" is its own oracle routing, weight 1: the manifold term
    # Σ_j W_ij ‖r_i − r_j‖² is then ‖r_i − r_i*‖².
    self_only = Neighbourhood(torch.arange(n).unsqueeze(-1), torch.ones(n, 1))
    regression = replace(
        config, regularizer="manifold", lambda_max=1.0, lambda_warmup_steps=0, task_loss=False
    )
    return train_routers(
        routed,
        tokenizer,
        examples,
        layers,
        regression,
        token=token,
        continuation=continuation,
        targets_NP=oracle_routing_NP,
        neighbourhood=self_only,
        seed=seed,
    )
