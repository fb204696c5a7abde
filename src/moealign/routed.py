"""A model whose routers moealign can read and train: the seam between methods and models.

Router post-training (RoMA, DESIGN.md §5), routing diagnostics and test-time re-mixing need
three things from a model, whatever its origin (ours or Hugging Face): the routing softmax of
every MoE layer for every token, the logits, and the router parameters. :class:`RoutedModel`
names them; :class:`MoealignRouted` provides them for :class:`MoETransformer`, and
``moealign.integrations.hf`` for transformers MoE models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor, nn

from moealign.nn.transformer import MoETransformer


@dataclass
class RoutedOutput:
    logits: Tensor  # (B, S, V)
    probs: list[Tensor]  # one (B, S, E) full routing softmax per MoE layer, in depth order


class RoutedModel(Protocol):
    """What router-level methods need from a model."""

    model: nn.Module

    def n_moe_layers(self) -> int: ...

    def router_parameters(self, layers: list[int]) -> list[nn.Parameter]:
        """The trainable router weights of the given MoE layers (indices in depth order)."""
        ...

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> RoutedOutput:
        """Logits and per-layer routing probabilities, differentiable w.r.t. the routers."""
        ...


class MoealignRouted:
    """:class:`RoutedModel` view of a :class:`MoETransformer` (right padding needs no mask)."""

    def __init__(self, model: MoETransformer):
        self.model = model

    def n_moe_layers(self) -> int:
        return len(self.model.moe_layers)

    def router_parameters(self, layers: list[int]) -> list[nn.Parameter]:
        moe_layers = self.model.moe_layers
        return [p for i in layers for p in moe_layers[i].router.parameters()]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> RoutedOutput:
        output = self.model(input_ids)
        batch, seq_len = input_ids.shape
        probs = [info.probs.view(batch, seq_len, -1) for info in output.routing]
        return RoutedOutput(output.logits, probs)
