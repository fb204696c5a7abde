"""Test-time routing baselines of RoMA (DESIGN.md §5): C3PO kernel-regression re-mixing and
oracle routing. Both change only the routing of the chosen layers at the routed token
(:meth:`moealign.nn.routed.RoutedModel.override_routing`), never a weight.

C3PO (arXiv 2504.07964, kernel-regression surrogate): for a test question q with neighbours
N(q) among the successful training samples and kernel weights W_qj (normalised over N(q),
:mod:`moealign.roma.neighbours`), per layer l

    r_q,l ← α r_q,l + (1 − α) Σ_{j∈N(q)} W_qj r_j,l

(a convex mixture of distributions, so it stays one); a question with no neighbours keeps its
routing. Oracle routing: per question, gradient descent (Adam) with the label on the routing
logits z (r = softmax(z), initialised at the model's own routing, z = log r) of the chosen
layers to minimise the CE over the options — the upper bound of what routing alone can reach.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
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
    choice_loss,
    encode_questions,
    frozen_eval,
    model_device,
    only_trainable,
    option_scores,
    replace_at_positions,
    routing_per_layer,
)
from moealign.roma.neighbours import Neighbourhood

# Floor of the probabilities whose log initialises the oracle's routing logits.
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


def _softmax_overrides(
    layers: Sequence[int], batch: ChoiceBatch, logits_BLE: Tensor
) -> dict[int, object]:
    logits_RLE = logits_BLE[batch.question_R]

    def fixed(slot: int):
        return replace_at_positions(batch, lambda _: logits_RLE[:, slot].softmax(-1))

    return {layer: fixed(slot) for slot, layer in enumerate(layers)}


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
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps={steps!r} is not accepted; expected an integer >= 1")
    if not lr > 0:
        raise ValueError(f"lr={lr!r} is not accepted; expected a float > 0")
    questions = encode_questions(examples, tokenizer, token, continuation)
    device = model_device(routed)
    result = CaptureBuilder()
    with frozen_eval(routed), only_trainable(routed, []):
        for _, batch in batches(questions, batch_size, tokenizer.pad_id, device):
            with torch.no_grad():
                own_BLE = routing_per_layer(routed.forward(batch.input_ids_RS), layers, batch)
            logits_BLE = own_BLE.clamp_min(_LOG_FLOOR).log().detach().requires_grad_(True)
            optimizer = torch.optim.Adam([logits_BLE], lr=lr)
            for _ in range(steps):
                with routed.override_routing(_softmax_overrides(layers, batch, logits_BLE)):
                    output = routed.forward(batch.input_ids_RS)
                loss = choice_loss(option_scores(output, batch), batch.gold_B) * len(batch.gold_B)
                (logits_BLE.grad,) = torch.autograd.grad(loss, [logits_BLE])
                optimizer.step()
            with (
                torch.no_grad(),
                routed.override_routing(_softmax_overrides(layers, batch, logits_BLE)),
            ):
                result.add(routed.forward(batch.input_ids_RS), batch, layers)
    return result.build()
