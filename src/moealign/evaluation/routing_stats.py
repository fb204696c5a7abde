"""Routing statistics: one accumulator, one name per quantity (DESIGN.md §3–4).

:class:`RoutingStats` sums what the routers of L MoE layers did over a *window* of batches and
:meth:`RoutingStats.summary` turns the sums into a typed :class:`RoutingSummary`. Training (one
window per optimizer step, and one per evaluation), ``moealign eval``, ``moealign analyze`` and
the Hugging Face capture all use it; the guardrails read the typed summary, never metric names.
It lives in ``evaluation/`` beside the diagnostics it is built from: training, the guardrails
(``alignment/``) and ``integrations/`` consume it, and none of them is below the other.

Every statistic is per layer l; a record (:meth:`RoutingSummary.record`) holds
``<prefix>layer{l}/<name>`` and ``<prefix><name>``, the mean over layers. The names and their
definitions are :data:`STATISTICS` (and :data:`ARRAYS`, per expert), with c_e the token slots
expert e processed in the window and p_t the full routing softmax of token t; the
"Routing statistics" table of docs/routers.md lists the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moealign.evaluation import diagnostics
from moealign.nn.moe import MoELayer, RoutingInfo

__all__ = [
    "ARRAYS",
    "STATISTICS",
    "MissingStatisticError",
    "RoutingStats",
    "RoutingSummary",
    "moe_shape",
]

STATISTICS: dict[str, str] = {
    "balance_loss": "L_bal = E·Σ_e f_e P_e of each batch (1 = balanced), mean over the window's "
    "batches (DESIGN.md §4)",
    "z_loss": "L_z = mean_t (logsumexp_e logits_te)² of each batch, mean over the window's batches",
    "max_vio": "MaxVio = (max_e c_e − mean_e c_e) / mean_e c_e of the loads summed over the "
    "window: a training step's global batch, or a whole evaluation set (MaxVio_global)",
    "max_vio_batch": "mean over the window's batches (training: micro-batches of every rank; "
    "evaluation: validation batches) of each batch's own MaxVio (MaxVio_batch)",
    "dead_experts": "number of experts with c_e = 0 in the window",
    "usage_entropy": "H(c / Σc) / log E of the window's loads (1 = uniform use)",
    "token_entropy": "mean over the window's tokens of H(p_t) / log E",
    "task_entropy": "H(p_l(·|τ)) / log E with p_l(e|τ) the mean of p_te over task τ's tokens; "
    "per task as task_entropy/<task>, task_entropy itself the mean over the tasks present",
    "projection_alignment": "mean over experts of λ_e = ‖W_g[e] r_e‖ / (‖r_e‖ σ_max(W_g[e])) "
    "(MPI Eq. 11, DESIGN.md §3) for the effective router rows: R′ for MPI, R_eff for a "
    "precomputed router (its stored rows), R otherwise; evaluation records only",
    "projection_alignment_raw": "the same λ for the stored router rows R (equal to "
    "projection_alignment except for MPI routers); evaluation records only",
    "router_grad_norm": "‖∇ router parameters‖₂ before clipping; training records only",
}
ARRAYS: dict[str, str] = {
    "expert_counts": "(L, E) c_e per layer and expert over the window",
    "expert_utilisation": "(L, E) c_e / mean_e c_e (1 = balanced)",
}


class MissingStatisticError(LookupError):
    """A statistic that a reader (e.g. a guardrail) needs is not in the summary."""


def moe_shape(model: nn.Module) -> tuple[int, int]:
    """(L MoE layers, E experts) of a moealign model; (0, 0) without MoE layers."""
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    return len(layers), (layers[0].n_experts if layers else 0)


@dataclass
class RoutingSummary:
    """The statistics of one window, per MoE layer (float64 on the CPU); see the module
    docstring for the definitions. Optional entries are None when the window did not measure
    them (``projection_alignment*`` outside evaluation, ``router_grad_norm`` outside training,
    ``task_entropy`` without task tokens)."""

    expert_counts: Tensor
    balance_loss: Tensor
    z_loss: Tensor
    token_entropy: Tensor
    max_vio_batch: Tensor
    tokens: int
    batches: int
    task_entropy: dict[str, Tensor] = field(default_factory=dict)
    projection_alignment: Tensor | None = None
    projection_alignment_raw: Tensor | None = None
    router_grad_norm: Tensor | None = None

    @property
    def n_layers(self) -> int:
        return self.expert_counts.shape[0]

    @property
    def max_vio(self) -> Tensor:
        return diagnostics.max_violation(self.expert_counts)

    @property
    def dead_experts(self) -> Tensor:
        return diagnostics.dead_experts(self.expert_counts).double()

    @property
    def usage_entropy(self) -> Tensor:
        return diagnostics.usage_entropy(self.expert_counts)

    @property
    def expert_utilisation(self) -> Tensor:
        return diagnostics.expert_utilisation(self.expert_counts)

    def with_projection_alignment(self, model: nn.Module | None) -> RoutingSummary:
        """Fill ``projection_alignment`` and ``projection_alignment_raw`` from a moealign
        ``model``'s weights (:func:`diagnostics.routing_projection_alignment`); no change for
        None. Returns self."""
        if model is not None:
            effective = diagnostics.routing_projection_alignment(model, "effective")
            raw = diagnostics.routing_projection_alignment(model, "raw")
            self.projection_alignment = torch.tensor(effective, dtype=torch.float64)
            self.projection_alignment_raw = torch.tensor(raw, dtype=torch.float64)
        return self

    def per_layer(self) -> dict[str, Tensor]:
        """Every measured statistic of :data:`STATISTICS` by name, each of shape (L,), then the
        per-task entropies as ``task_entropy/<task>``."""
        values: dict[str, Tensor | None] = {
            "balance_loss": self.balance_loss,
            "z_loss": self.z_loss,
            "max_vio": self.max_vio,
            "max_vio_batch": self.max_vio_batch,
            "dead_experts": self.dead_experts,
            "usage_entropy": self.usage_entropy,
            "token_entropy": self.token_entropy,
            "task_entropy": (
                torch.stack(list(self.task_entropy.values()), -1).mean(-1)
                if self.task_entropy
                else None
            ),
            "projection_alignment": self.projection_alignment,
            "projection_alignment_raw": self.projection_alignment_raw,
            "router_grad_norm": self.router_grad_norm,
        }
        values |= {f"task_entropy/{task}": v for task, v in self.task_entropy.items()}
        return {name: value for name, value in values.items() if value is not None}

    def require(self, name: str) -> Tensor:
        """Statistic ``name`` per layer; :class:`MissingStatisticError` when the window did not
        measure it or has no MoE layer, so that a reader never mistakes absence for health."""
        value = self.per_layer().get(name)
        if value is None or value.numel() == 0:
            raise MissingStatisticError(
                f"routing statistic {name!r} is missing (measured: "
                f"{', '.join(self.per_layer()) if self.n_layers else 'nothing, no MoE layer'})"
            )
        return value

    def record(self, prefix: str) -> dict[str, float]:
        """Flat record: ``{prefix}{name}`` (mean over layers) and ``{prefix}layer{l}/{name}``."""
        out: dict[str, float] = {}
        for name, value_L in self.per_layer().items():
            values = value_L.tolist()
            if "/" not in name:  # per-task entropies only per layer (tasks differ by layer)
                out[f"{prefix}{name}"] = sum(values) / len(values)
            for layer, value in enumerate(values):
                out[f"{prefix}layer{layer}/{name}"] = value
        return out

    def layer_rows(self, layer_ids: Sequence[int] | None = None) -> list[dict]:
        """One dict per layer: ``layer`` (``layer_ids[l]``, default l), ``tokens``, the arrays
        ``expert_counts`` and ``expert_utilisation`` for that layer and every statistic."""
        layer_ids = list(range(self.n_layers)) if layer_ids is None else list(layer_ids)
        statistics = self.per_layer()
        rows = []
        for index, layer in enumerate(layer_ids):
            row: dict = {
                "layer": layer,
                "tokens": self.tokens,
                "expert_counts": self.expert_counts[index].round().long().tolist(),
                "expert_utilisation": self.expert_utilisation[index].tolist(),
            }
            row |= {name: float(value[index]) for name, value in statistics.items()}
            row["dead_experts"] = int(row["dead_experts"])  # a count, per layer
            rows.append(row)
        return rows


class RoutingStats:
    """Sums of routing statistics over the batches of one window (DESIGN.md §3–4).

    ``RoutingStats(n_layers, n_experts, task_names=..., device=...)``; :meth:`add` one batch's
    routing (one :class:`~moealign.nn.moe.RoutingInfo` per layer, optionally with the batch's
    ``task_ids``, −1 = no task, indexing ``task_names``); :meth:`reduce` sums the window over
    data-parallel ranks with **one** collective (every sum lives in one float64 buffer); then
    :meth:`summary`. A rank that saw no batch joins the reduction with zeros.
    """

    def __init__(
        self,
        n_layers: int,
        n_experts: int,
        *,
        task_names: Sequence[str] = (),
        device: torch.device | str = "cpu",
    ):
        if n_layers < 1 or n_experts < 1:
            raise ValueError(
                f"n_layers={n_layers}, n_experts={n_experts}: expected >= 1 MoE layer and expert"
            )
        self.n_layers, self.n_experts, self.task_names = n_layers, n_experts, list(task_names)
        L, E, N = n_layers, n_experts, len(self.task_names)  # noqa: N806 (shape letters)
        sizes = [L * E, L, L, L, L, L * N * E, N, 2]
        self.buffer = torch.zeros(sum(sizes), dtype=torch.float64, device=device)
        parts = self.buffer.split(sizes)
        self.counts_LE = parts[0].view(L, E)
        self.balance_sum_L, self.z_sum_L, self.entropy_sum_L, self.max_vio_sum_L = parts[1:5]
        self.task_probs_LNE = parts[5].view(L, N, E)
        self.task_tokens_N = parts[6]
        self.totals = parts[7]  # tokens, batches

    def add(self, routing: Sequence[RoutingInfo], task_ids: Tensor | None = None) -> None:
        """Add one batch: every layer's routing of the same T tokens."""
        if len(routing) != self.n_layers:
            raise ValueError(f"got routing of {len(routing)} layers; expected {self.n_layers}")
        device = self.buffer.device
        counts_LE = torch.stack([info.expert_counts.detach() for info in routing]).to(device)
        counts_LE = counts_LE.double()
        self.counts_LE += counts_LE
        self.balance_sum_L += torch.stack([i.load_balance_loss.detach() for i in routing]).to(
            device, torch.float64
        )
        self.z_sum_L += torch.stack([i.z_loss.detach() for i in routing]).to(device, torch.float64)
        # Σ_t H(p_t)/log E per layer (token-weighted, so that batches pool exactly)
        self.entropy_sum_L += torch.stack(
            [diagnostics.entropy(info.probs.detach()).sum() for info in routing]
        ).to(device)
        self.max_vio_sum_L += diagnostics.max_violation(counts_LE)
        if task_ids is not None and self.task_names:
            self._add_tasks(routing, task_ids)
        self.totals += torch.tensor([routing[0].probs.shape[0], 1.0], device=device)

    def _add_tasks(self, routing: Sequence[RoutingInfo], task_ids: Tensor) -> None:
        task_ids_T = task_ids.reshape(-1).to(self.buffer.device)
        labelled_T = task_ids_T >= 0
        ids = task_ids_T[labelled_T]
        self.task_tokens_N += torch.bincount(ids, minlength=len(self.task_names)).double()
        probs_LTE = torch.stack([info.probs.detach() for info in routing]).to(self.buffer.device)
        self.task_probs_LNE.index_add_(1, ids, probs_LTE[:, labelled_T].double())

    def reduce(self, reduce_sum: Callable[[Tensor], Tensor]) -> None:
        """Sum the window over ranks in place: ``reduce_sum`` is an in-place all-reduce (sum),
        e.g. :meth:`DistributedContext.all_reduce_sum`; call it on every rank."""
        reduce_sum(self.buffer)

    def summary(self) -> RoutingSummary:
        """The window's statistics; ValueError when no batch was added (on any rank)."""
        tokens, batches = self.totals.tolist()
        if batches == 0:
            raise ValueError("no routing was recorded; add at least one batch")
        cpu = self.buffer.cpu()  # one copy; the views below are slices of it
        L, E, N = self.n_layers, self.n_experts, len(self.task_names)  # noqa: N806
        counts_LE, rest = cpu[: L * E].view(L, E), cpu[L * E :]
        balance_L, z_L, entropy_L, max_vio_L = rest[: 4 * L].view(4, L)
        task_probs_LNE = rest[4 * L : 4 * L + L * N * E].view(L, N, E)
        task_tokens_N = rest[4 * L + L * N * E : 4 * L + L * N * E + N]
        present_N = task_tokens_N > 0
        task_entropy = {}
        if present_N.any():
            p_LNE = task_probs_LNE[:, present_N] / task_tokens_N[present_N, None]
            entropy_LN = diagnostics.entropy(p_LNE)
            names = [self.task_names[int(i)] for i in present_N.nonzero().flatten()]
            task_entropy = {name: entropy_LN[:, n] for n, name in enumerate(names)}
        return RoutingSummary(
            expert_counts=counts_LE.clone(),
            balance_loss=balance_L / batches,
            z_loss=z_L / batches,
            token_entropy=entropy_L / tokens,
            max_vio_batch=max_vio_L / batches,
            tokens=int(tokens),
            batches=int(batches),
            task_entropy=task_entropy,
        )
