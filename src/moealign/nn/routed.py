"""A model whose routers moealign can read and train: the seam between methods and models.

Router post-training (RoMA, DESIGN.md §5), routing diagnostics and test-time re-mixing need
three things from a model, whatever its origin (ours or Hugging Face): the routing softmax of
every MoE layer for every token, the logits, and the router parameters; test-time re-mixing
(C3PO) and oracle routing need a fourth, a way to replace the routing softmax of chosen layers
(:meth:`RoutedModel.override_routing`). :class:`RoutedModel` names them; :class:`MoealignRouted`
provides them for :class:`MoETransformer`, and ``moealign.integrations.hf`` for transformers MoE
models.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor, nn

from moealign.nn.transformer import MoETransformer

# probs (B, S, E) of one MoE layer -> the probabilities to route with instead (B, S, E).
ProbsOverride = Callable[[Tensor], Tensor]


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

    def override_routing(
        self, overrides: Mapping[int, ProbsOverride]
    ) -> contextlib.AbstractContextManager[None]:
        """Within the context, MoE layer l (depth-order index) routes with
        ``overrides[l](probs_BSE)`` instead of its own softmax ``probs_BSE``.

        Contract: a token whose row the function leaves equal keeps the router's decision bit
        for bit; for a changed token the top-K experts are re-selected from the new
        probabilities and weighted by them (renormalised over the K as the model's router
        does), gradients flow from the expert weights into the returned tensor, and
        :attr:`RoutedOutput.probs` reports the new probabilities. Layers not in ``overrides``
        are untouched; leaving the context restores normal routing, also on error.
        """
        ...


def check_override_layers(overrides: Mapping[int, ProbsOverride], n_layers: int) -> None:
    """ValueError unless every key of ``overrides`` is a MoE layer index 0..n_layers−1."""
    for index in overrides:
        if not (isinstance(index, int) and 0 <= index < n_layers):
            raise ValueError(
                f"overrides has layer {index!r}; accepted: MoE layer indices 0..{n_layers - 1}"
            )


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

    @contextlib.contextmanager
    def override_routing(self, overrides: Mapping[int, ProbsOverride]) -> Iterator[None]:
        """See :meth:`RoutedModel.override_routing`; implemented by
        :attr:`MoELayer.probs_override` and :meth:`moealign.nn.routers.Router.reroute`."""
        moe_layers = self.model.moe_layers
        check_override_layers(overrides, len(moe_layers))
        try:
            for index, override in overrides.items():
                moe_layers[index].probs_override = override
            yield
        finally:
            for index in overrides:
                moe_layers[index].probs_override = None
