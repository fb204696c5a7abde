"""The training objective: every loss term by name, one place that weights them (DESIGN.md §4).

For one optimizer step on a global batch split into M micro-batches over all ranks:

    L_total = L_lm + α · L_bal + β · L_z + Σ_j term_j

* L_lm: the token cross-entropy summed over the whole global batch and divided by its number of
  target tokens (labels ≠ −100), so that accumulation and data parallelism give the gradient
  of one big batch;
* L_bal, L_z: each MoE layer's load-balance and z-loss (:class:`~moealign.nn.moe.RoutingInfo`,
  computed by the layer from its routing), averaged over layers, then over the M micro-batches
  (each micro-batch is one "batch" of the balance loss); α = ``loss.balance_coef``,
  β = ``loss.z_coef``;
* term_j: extra terms (:class:`LossTerm`), averaged over micro-batches like the router terms,
  e.g. λ(t) · L_align (:class:`moealign.alignment.term.RoutingAlignment`, built from the
  ``alignment`` config section).

The trainer calls :meth:`Objective.micro_batch_loss` for each micro-batch (and backpropagates
it), :meth:`Objective.step_metrics` once per step and :meth:`Objective.end_step` after the
optimizer step; it never needs to know which terms exist.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from moealign.alignment.term import RoutingAlignment, build_alignment
from moealign.config import RunConfig
from moealign.data.batching import IGNORE_INDEX

__all__ = ["LossTerm", "Objective"]

Batch = Mapping[str, Tensor]
ReduceSum = Callable[[Tensor], Tensor]


@runtime_checkable
class LossTerm(Protocol):
    """An extra term of the objective. Subclass it to inherit the no-op defaults.

    ``term(batch, model_output, step)`` returns ``{name: tensor}`` for one micro-batch; each
    tensor is added to the loss as given (weighted by the term itself) and logged under its
    name (averaged over micro-batches). ``batch`` holds the micro-batch's tensors
    (``input_ids``, ``labels``, ``task_ids``), ``model_output`` its ``.logits`` and
    ``.routing``, ``step`` the optimizer steps taken so far.
    """

    def __call__(self, batch: Batch, output: Any, step: int) -> Mapping[str, Tensor]: ...

    def end_step(self, reduce_sum: ReduceSum, applied: bool) -> None:
        """Called on every rank after each optimizer step; ``applied`` is False when the step
        was skipped (non-finite loss or gradient, ``train.on_nonfinite="skip"``).
        ``reduce_sum`` sums a tensor over data-parallel ranks in place (a collective)."""

    def metrics(self) -> Mapping[str, float]:
        """Scalars to log with the step (e.g. the unweighted value and the weight)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """State checkpointed with the run (nested dicts, lists, numbers, tensors)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` on resume."""


class Objective:
    """L_total from its terms (module docstring); ``terms`` are the extra :class:`LossTerm`s."""

    def __init__(self, balance_coef: float, z_coef: float, terms: Sequence[LossTerm] = ()):
        for term in terms:
            if not isinstance(term, LossTerm):
                raise TypeError(
                    f"{type(term).__name__} is not a LossTerm: it needs __call__, end_step, "
                    "metrics, state_dict and load_state_dict (subclass "
                    "moealign.training.objective.LossTerm for the defaults)"
                )
        self.balance_coef, self.z_coef = balance_coef, z_coef
        self.terms = list(terms)
        self._sums: dict[str, Tensor] = {}

    @classmethod
    def from_config(
        cls, config: RunConfig, n_layers: int, n_experts: int, terms: Sequence[LossTerm] = ()
    ) -> Objective:
        """α and β from ``config.loss``, the given ``terms``, then the routing alignment of
        ``config.alignment`` (none when its schedule is ``none``)."""
        alignment = build_alignment(config.alignment, n_layers, n_experts)
        extra = [*terms, alignment] if alignment is not None else list(terms)
        return cls(config.loss.balance_coef, config.loss.z_coef, extra)

    @property
    def alignment(self) -> RoutingAlignment | None:
        """The routing alignment term, if the objective has one (the guardrails act on it)."""
        return next((t for t in self.terms if isinstance(t, RoutingAlignment)), None)

    def micro_batch_loss(
        self, batch: Batch, output: Any, step: int, lm_scale: float, n_micro: int
    ) -> Tensor:
        """This micro-batch's share of L_total, to backpropagate: Σ_t CE · ``lm_scale`` (the
        number of ranks over the global batch's target tokens) plus its router and extra
        terms over ``n_micro`` (this rank's micro-batches). Adds every term to the step's sums."""
        lm_sum = F.cross_entropy(
            output.logits.float().flatten(0, 1),
            batch["labels"].flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        routing = output.routing
        if routing:
            balance = torch.stack([r.load_balance_loss for r in routing]).float().mean()
            z = torch.stack([r.z_loss for r in routing]).float().mean()
        else:
            balance = z = torch.zeros((), device=lm_sum.device)
        terms = {"balance_loss": balance, "z_loss": z}
        aux = self.balance_coef * balance + self.z_coef * z
        for term in self.terms:
            extra = term(batch, output, step)
            terms.update(extra)
            aux = aux + sum(extra.values())
        for name, value in {"lm_loss_sum": lm_sum, "aux_loss": aux, **terms}.items():
            self._sums[name] = self._sums.get(name, 0.0) + value.detach().float()
        return lm_sum * lm_scale + aux / n_micro

    def step_metrics(
        self, reduce_sum: ReduceSum, global_tokens: float, n_micro_total: int
    ) -> dict[str, float]:
        """The step's terms, summed over ranks in one collective: ``lm_loss`` (token mean over
        the global batch), ``aux_loss`` (α·L_bal + β·L_z + Σ_j term_j), ``loss`` = their sum,
        and each term by name (unweighted ``balance_loss`` and ``z_loss``, extra terms as they
        returned them), averaged over the ``n_micro_total`` micro-batches of all ranks; then
        the extra terms' own :meth:`LossTerm.metrics`. Resets the sums."""
        names = list(self._sums)
        reduced = reduce_sum(torch.stack([self._sums[name] for name in names]))
        self._sums = {}
        metrics = {
            name: float(value) / (global_tokens if name == "lm_loss_sum" else n_micro_total)
            for name, value in zip(names, reduced.tolist(), strict=True)
        }
        metrics["lm_loss"] = metrics.pop("lm_loss_sum")
        metrics["loss"] = metrics["lm_loss"] + metrics["aux_loss"]
        for term in self.terms:
            metrics.update(term.metrics())
        return metrics

    def end_step(self, reduce_sum: ReduceSum, applied: bool) -> None:
        """After the optimizer step (``applied``) or its skip: every term's end_step."""
        for term in self.terms:
            term.end_step(reduce_sum, applied)

    def state_dict(self) -> list[dict[str, Any]]:
        return [term.state_dict() for term in self.terms]

    def load_state_dict(self, states: Sequence[Mapping[str, Any] | None]) -> None:
        """Restore the terms' states (a checkpoint of an older version may hold None for a
        stateless term)."""
        if len(states) != len(self.terms):
            raise ValueError(
                f"the checkpoint holds {len(states)} loss-term states; this objective has "
                f"{len(self.terms)} extra terms"
            )
        for term, state in zip(self.terms, states, strict=True):
            if state is not None:
                term.load_state_dict(state)
