"""moealign's MPI router, routing alignment term and routing statistics inside torchtitan
(DESIGN.md §10; tested with torchtitan 0.3).

torchtitan's ``MoE`` calls ``router(x_BLD, expert_bias_E)``, and its ``TokenChoiceTopKRouter``
scores whatever its ``gate`` returns (softmax or sigmoid, expert bias for selection only,
group-limited top-K, ``route_norm``, ``route_scale``). The MPI router is therefore a **gate**:
:class:`MPIGate` is torchtitan's ``Linear`` whose weight is the raw router R (E × D) and whose
forward returns the MPI logits

    logits_te = ⟨x_t, r_eff,e⟩ / τ,   R_eff = C · retract(power(R)),  A_e = ``w1_EFD[e]``

(:func:`moealign.nn.routers.mpi_rows`, DESIGN.md §3), so torchtitan's own router class, its
return contract, ``expert_bias_E`` and the sharding code that writes ``router.gate`` are
untouched. :class:`MPIMoE` is torchtitan's ``MoE`` that binds the gate to its ``GroupedExperts``
once built; :func:`mpi_moe_config` turns any ``MoE.Config`` into its config. C = C′/√E, or the
released code's fixed ``logit_scale`` (0.125).

Expert parallelism: ``w1_EFD`` is a DTensor sharded on experts (``Shard(0)``); each rank powers
its own experts' rows and the E × D R_eff is all-gathered (backward: reduce-scatter). Expert
tensor parallelism (``Shard(1)``, F split): the partial products A_eᵀA_e r_e are all-reduced.

The routing of every MoE layer is read by forward hooks (:class:`RoutingRecorder`), for the
alignment term (:class:`AlignmentTerm`, DESIGN.md §4) and the statistics
(:func:`routing_metrics`), which go to torchtitan's metrics logger. :func:`precompute` writes
R_eff into a stock ``Linear`` gate (a checkpoint stock torchtitan loads);
:func:`read_checkpoint` reads a torchtitan checkpoint's MoE weights into moealign's layout;
:func:`export_hf` writes a torchtitan Qwen3 MoE model (live, or a DCP checkpoint loaded by
:func:`load_checkpoint`) as a Hugging Face Qwen3-MoE folder, which ``moealign analyze``,
``compress`` and ``roma --hf-model`` read.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import NoReturn

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard
from torchtitan.models.common.config_utils import (
    make_moe_config,
    make_routed_experts_config,
    make_router_config,
)
from torchtitan.models.common.linear import Linear
from torchtitan.models.common.moe import MoE
from torchtitan.models.common.rope import CosSinRoPE

from moealign.alignment.guardrails import RoutingGuardrail
from moealign.alignment.term import RoutingAlignment
from moealign.evaluation import diagnostics
from moealign.evaluation.routing_stats import RoutingStats, RoutingSummary
from moealign.nn.experts import count_slots_per_expert
from moealign.nn.losses import load_balance_loss, z_loss
from moealign.nn.moe import MoELayer, RoutingInfo
from moealign.nn.routers import MPI_EXPERT_MATRICES, OptionError, mpi_rows

__all__ = [
    "AlignmentTerm",
    "export_hf",
    "load_checkpoint",
    "MPIGate",
    "MPIMoE",
    "RoutingRecorder",
    "moe_layers",
    "moe_weights",
    "mpi_moe_config",
    "precompute",
    "read_checkpoint",
    "router_grad_norms",
    "routing_metrics",
    "routing_summary",
    "softmax_moe_config",
    "to_moe_layer",
]


# torchtitan's GroupedExperts parameters → moealign's SwiGLUExperts ones (the same layouts)
_EXPERT_KEYS = {"w1_EFD": "w_gate", "w3_EFD": "w_up", "w2_EDF": "w_down"}


class MPIGate(Linear):
    """torchtitan's router ``gate`` with MPI logits (module docstring; DESIGN.md §3).

    ``weight`` (E, D) is the raw router R; :meth:`bind` hands it the ``GroupedExperts`` whose
    ``w1_EFD`` (``w3_EFD`` for ``expert_matrix="up"``, ``w2_EDF`` transposed for ``"down"``)
    drives the power step. Options as :class:`moealign.nn.routers.MPIRouter`, plus
    ``logit_scale``: a fixed C in place of C′/√E (0.125 reproduces the authors' released code).
    """

    @dataclasses.dataclass(kw_only=True, slots=True)
    class Config(Linear.Config):
        c_prime: float = 4.0
        logit_scale: float | None = None
        power_steps: int = 1
        retract: bool = True
        power: bool = True
        detach_experts: bool = False
        expert_matrix: str = "gate"
        temperature: float = 1.0

        def __post_init__(self) -> None:
            checks = (
                ("c_prime", self.c_prime > 0, "a float > 0"),
                (
                    "logit_scale",
                    self.logit_scale is None or self.logit_scale > 0,
                    "None (C = c_prime / sqrt(E)) or a float > 0",
                ),
                (
                    "power_steps",
                    isinstance(self.power_steps, int) and self.power_steps >= 1,
                    "an integer >= 1",
                ),
                (
                    "expert_matrix",
                    self.expert_matrix in MPI_EXPERT_MATRICES,
                    f"one of {MPI_EXPERT_MATRICES}",
                ),
                ("temperature", self.temperature > 0, "a float > 0"),
                ("bias", not self.bias, "False (the MPI router has no bias)"),
            )
            for name, ok, accepted in checks:
                if not ok:
                    raise OptionError(name, getattr(self, name), accepted)

    def __init__(self, config: Config):
        super().__init__(config)
        linear = {f.name for f in dataclasses.fields(Linear.Config)}
        self.options = {
            f.name: getattr(config, f.name)
            for f in dataclasses.fields(config)
            if f.name not in linear
        }
        n_experts = config.out_features
        self.scale = config.logit_scale or config.c_prime / math.sqrt(n_experts)
        self.temperature = config.temperature
        self._experts: nn.Module | None = None  # bound by MPIMoE; not a submodule

    def bind(self, experts: nn.Module) -> None:
        """Read the drive matrix from ``experts`` (a torchtitan ``GroupedExperts``)."""
        object.__setattr__(self, "_experts", experts)  # a reference, not a child module

    def drive_matrix(self) -> Tensor:
        """A (E, F, D) as stored (a DTensor under expert or tensor parallelism)."""
        if self._experts is None:
            raise RuntimeError("MPIGate is not bound to experts: build it through MPIMoE")
        choice = self.options["expert_matrix"]
        if choice == "gate":
            return self._experts.w1_EFD
        if choice == "up":
            return self._experts.w3_EFD
        return self._experts.w2_EDF.transpose(1, 2)

    def effective_weight(self) -> Tensor:
        """R_eff = C · retract(power(R)) / τ, (E, D) fp32: logits = x R_effᵀ. Under expert
        parallelism every rank powers its own experts' rows, then R_eff is all-gathered."""
        rows_ED = self.weight.full_tensor() if isinstance(self.weight, DTensor) else self.weight
        matrix = self.drive_matrix()
        gather = partial_sum = split = None
        if isinstance(matrix, DTensor):
            mesh, placements = matrix.device_mesh, matrix.placements
            for dim, placement in enumerate(placements):
                if placement == Shard(0):  # experts split: power own rows, all-gather
                    n_local = matrix.to_local().shape[0]
                    first = mesh.get_local_rank(dim) * n_local
                    rows_ED = rows_ED[first : first + n_local]
                    gather = mesh.get_group(dim)
                elif placement == Shard(1):  # F split: A_eᵀA_e r_e is a sum over ranks
                    split = mesh.get_group(dim)
                    rows_ED = _GroupSum.apply(split, rows_ED, False, True, 1.0)
                    partial_sum = partial(_sum_partial, split)
            matrix = matrix.to_local()
        o = self.options
        effective_ED = mpi_rows(
            rows_ED,
            matrix,
            scale=self.scale / self.temperature,
            power_steps=o["power_steps"],
            retract=o["retract"],
            power=o["power"],
            detach_experts=o["detach_experts"],
            sum_partial=partial_sum,
        )
        if split is not None:
            scale = 1.0 / dist.get_world_size(split)
            effective_ED = _GroupSum.apply(split, effective_ED, False, False, scale)
        if gather is not None:  # backward: reduce-scatter of the rows' gradients
            effective_ED = funcol.all_gather_single_autograd(effective_ED.contiguous(), 0, gather)
        return effective_ED

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 (the name torchtitan shards)
        """Logits x R_effᵀ in fp32 (or wider). A DTensor input (torchtitan's sequence-split
        router input under expert parallelism) is scored shard by shard and returned with its
        placements; the gate's gradient is then each rank's own tokens' part, summed by the
        data-parallel reduction as in the plain-tensor case."""
        weight_ED = self.effective_weight()
        if isinstance(input, DTensor):
            local = self._logits(input.to_local(), weight_ED)
            return DTensor.from_local(local, input.device_mesh, input.placements)
        return self._logits(input, weight_ED)

    @staticmethod
    def _logits(x: Tensor, weight_ED: Tensor) -> Tensor:
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x, weight_ED.to(x.dtype))


class _GroupSum(torch.autograd.Function):
    """Identity or all-reduce (sum) over ``group`` forward; the gradient all-reduced (or not)
    and scaled by ``grad_scale`` backward. The three conjugates of expert tensor parallelism
    (every rank of the group holds the same tokens, rows and loss; only A_e's F rows differ):
    entering the power step (identity; gradient summed: each rank's A_eⁱ adds its part),
    after each partial step (sum; gradient summed: it flows into the next step's partial), and
    leaving (identity; gradient ÷ N, undoing the last sum's copy of a replicated gradient)."""

    @staticmethod
    def forward(ctx, group, tensor: Tensor, forward_sum: bool, backward_sum: bool, grad_scale):
        ctx.group, ctx.backward_sum, ctx.grad_scale = group, backward_sum, grad_scale
        tensor = tensor.clone()
        if forward_sum:
            dist.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad * ctx.grad_scale
        if ctx.backward_sum:
            dist.all_reduce(grad, group=ctx.group)
        return None, grad, None, None, None


def _sum_partial(group: dist.ProcessGroup, partial_ED: Tensor) -> Tensor:
    return _GroupSum.apply(group, partial_ED, True, True, 1.0)


class MPIMoE(MoE):
    """torchtitan's ``MoE`` whose router gate is an :class:`MPIGate` bound to its experts."""

    @dataclasses.dataclass(kw_only=True, slots=True)
    class Config(MoE.Config):
        pass

    def __init__(self, config: Config):
        super().__init__(config)
        if not isinstance(self.router.gate, MPIGate):
            raise TypeError("MPIMoE needs router.gate = MPIGate.Config: use mpi_moe_config")
        self.router.gate.bind(self.routed_experts.inner_experts)


def mpi_moe_config(moe_config: MoE.Config, **mpi_options) -> MPIMoE.Config:
    """The ``MoE.Config`` ``moe_config`` with the MPI router: its ``build()`` gives torchtitan's
    ``MoE`` (:class:`MPIMoE`) whose router gate is an :class:`MPIGate` bound to its experts.

    ``mpi_options``: ``c_prime`` (4), ``logit_scale`` (None; 0.125 = the released code),
    ``power_steps`` (1), ``retract``, ``power``, ``detach_experts``, ``expert_matrix``
    (``gate``/``up``/``down``), ``temperature``; an unknown name or a bad value raises
    ``ValueError``. Everything else (score function, top-K, route norm and scale, groups,
    expert bias, dispatcher, shared experts, initialisation, sharding) is ``moe_config``'s.
    """
    gate = moe_config.router.gate
    allowed = {f.name for f in dataclasses.fields(MPIGate.Config)} - {
        f.name for f in dataclasses.fields(Linear.Config)
    }
    unknown = sorted(set(mpi_options) - allowed)
    if unknown:
        raise ValueError(f"MPI option(s) {unknown} not accepted; choose from {sorted(allowed)}")
    inherited = {f.name: getattr(gate, f.name) for f in dataclasses.fields(Linear.Config)}
    mpi_gate = MPIGate.Config(**inherited, **mpi_options)
    router = dataclasses.replace(moe_config.router, gate=mpi_gate)
    fields = {f.name: getattr(moe_config, f.name) for f in dataclasses.fields(MoE.Config)}
    return MPIMoE.Config(**(fields | {"router": router}))


def softmax_moe_config(
    dim: int,
    hidden_dim: int,
    num_experts: int,
    top_k: int,
    *,
    param_init: Callable[[Tensor], object],
    load_balance_coeff: float | None = None,
) -> MoE.Config:
    """torchtitan's ``MoE.Config`` routed as moealign's ``MoELayer``: softmax scores over all E
    experts, renormalised over the top-K (``route_norm``), no shared expert, torchtitan's
    all-to-all dispatcher (local without expert parallelism); every weight initialised by
    ``param_init``; ``load_balance_coeff`` turns on torchtitan's expert bias."""
    init = {"weight": param_init}
    return make_moe_config(
        num_experts=num_experts,
        router=make_router_config(
            dim=dim,
            num_experts=num_experts,
            gate_param_init=init,
            top_k=top_k,
            score_func="softmax",
            route_norm=True,
        ),
        routed_experts=make_routed_experts_config(
            dim=dim,
            hidden_dim=hidden_dim,
            num_experts=num_experts,
            top_k=top_k,
            param_init={name: param_init for name in _EXPERT_KEYS},
            comm_backend="standard",
        ),
        load_balance_coeff=load_balance_coeff,
    )


def moe_layers(model: nn.Module) -> list[MoE]:
    """The torchtitan ``MoE`` modules of ``model`` in depth order."""
    return [module for module in model.modules() if isinstance(module, MoE)]


@torch.no_grad()
def precompute(model: nn.Module) -> nn.Module:
    """Replace every :class:`MPIGate` by a stock torchtitan ``Linear`` holding R_eff (DESIGN.md
    §3 "Inference"): the same logits, so the stock ``TokenChoiceTopKRouter`` routes every
    token as the MPI router did, at no extra cost. The state dict keeps its keys
    (``...router.gate.weight``), so it loads into a model built from the original
    ``MoE.Config``. Returns ``model`` (changed in place)."""
    for moe in moe_layers(model):
        gate = moe.router.gate
        if isinstance(gate, MPIGate):
            plain = Linear(
                Linear.Config(in_features=gate.in_features, out_features=gate.out_features)
            )
            plain.weight.copy_(gate.effective_weight().to(plain.weight.dtype))
            moe.router.gate = plain.to(device=gate.weight.device).train(gate.training)
    return model


# --------------------------------------------------------------------------- routing records


class RoutingRecorder:
    """Forward hooks on the routers of every torchtitan ``MoE`` of a model: after a forward,
    :attr:`routing` holds one :class:`moealign.nn.moe.RoutingInfo` per MoE layer (depth order)
    for the T = B·L tokens: ``logits`` = the gate output (fp32), ``probs`` = softmax(logits)
    (the full routing softmax the alignment term and the statistics read, DESIGN.md §2; equal
    to torchtitan's ``scores_BLE`` when ``score_func="softmax"``), the experts and weights
    torchtitan's router returned, the expert counts, the balance loss and the z-loss.

    Works for stock and MPI gates alike. A context manager (or call :meth:`remove`); each
    forward replaces the records of the layers it runs.
    """

    def __init__(self, model: nn.Module):
        self.layers = moe_layers(model)
        if not self.layers:
            raise ValueError("the model has no torchtitan MoE layer")
        self.n_experts = self.layers[0].router.num_experts
        self._logits: dict[int, Tensor] = {}
        self._routing: dict[int, RoutingInfo] = {}
        self._handles = []
        for index, moe in enumerate(self.layers):
            self._handles.append(moe.router.gate.register_forward_hook(self._gate_hook(index)))
            self._handles.append(moe.router.register_forward_hook(self._router_hook(index)))

    @property
    def routing(self) -> list[RoutingInfo]:
        """The last forward's routing of every MoE layer, in depth order."""
        return [self._routing[index] for index in sorted(self._routing)]

    def _gate_hook(self, index: int) -> Callable:
        def hook(module, args, output):
            self._logits[index] = output

        return hook

    def _router_hook(self, index: int) -> Callable:
        def hook(module, args, output):
            topk_weight_BLK, topk_idx_BLK, _ = output
            logits = self._logits.pop(index)
            logits_TE = logits.reshape(-1, logits.shape[-1]).float()
            probs_TE = torch.softmax(logits_TE, -1)
            topk_idx_TK = topk_idx_BLK.reshape(-1, topk_idx_BLK.shape[-1])
            self._routing[index] = RoutingInfo(
                logits=logits_TE,
                probs=probs_TE,
                topk_idx=topk_idx_TK,
                topk_weight=topk_weight_BLK.reshape(topk_idx_TK.shape),
                keep=None,
                expert_counts=count_slots_per_expert(topk_idx_TK, self.n_experts),
                load_balance_loss=load_balance_loss(probs_TE, topk_idx_TK, self.n_experts),
                z_loss=z_loss(logits_TE),
            )

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> RoutingRecorder:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class AlignmentTerm:
    """The routing alignment term λ(t)·L_align (DESIGN.md §4) for a torchtitan model: moealign's
    :class:`~moealign.alignment.term.RoutingAlignment` (prior, λ schedule, entropy bonus) fed
    by a :class:`RoutingRecorder`, with its :class:`~moealign.alignment.guardrails.
    RoutingGuardrail` when given.

    ``term(task_ids_BL, step)`` after the model's forward returns the scalar to add to
    torchtitan's loss (per micro-batch, like the balance loss); ``task_ids_BL`` comes from the
    batch (−1 = no task). After the optimizer step, :meth:`end_step` updates the marginal prior
    over the global batch (summed over ``group``) and lets the guardrail read the step's
    :class:`~moealign.evaluation.routing_stats.RoutingSummary`. ``state_dict`` /
    ``load_state_dict`` make it a checkpoint ``Stateful`` (torchtitan's checkpointer or DCP).
    """

    def __init__(
        self,
        recorder: RoutingRecorder,
        alignment: RoutingAlignment,
        guardrail: RoutingGuardrail | None = None,
    ):
        self.recorder, self.alignment, self.guardrail = recorder, alignment, guardrail

    def __call__(self, task_ids_BL: Tensor, step: int) -> Tensor:
        output = SimpleNamespace(routing=self.recorder.routing)
        return self.alignment({"task_ids": task_ids_BL}, output, step)["align_loss"]

    def end_step(
        self,
        step: int,
        summary: RoutingSummary | None = None,
        applied: bool = True,
        group: dist.ProcessGroup | None = None,
    ) -> dict | None:
        """Prior update (every rank calls it: a collective when a process group runs), then the
        guardrail's check of ``summary``; returns its event record, if any."""
        self.alignment.end_step(partial(_reduce_sum, group=group), applied)
        if self.guardrail is None or summary is None:
            return None
        return self.guardrail.check(step, summary)

    def metrics(self) -> dict[str, float]:
        return self.alignment.metrics()

    def state_dict(self) -> dict:
        state = {"alignment": self.alignment.state_dict()}
        if self.guardrail is not None:
            state["guardrail"] = self.guardrail.state_dict()
        return state

    def load_state_dict(self, state: Mapping) -> None:
        self.alignment.load_state_dict(state["alignment"])
        if self.guardrail is not None:
            self.guardrail.load_state_dict(state["guardrail"])


def _reduce_sum(tensor: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Sum over ``group`` in place (no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, group=group)
    return tensor


# --------------------------------------------------------------------------- statistics


@torch.no_grad()
def projection_alignments(model: nn.Module, rows: str) -> list[float]:
    """Per MoE layer the mean over experts of λ_e = ‖W_g[e] r_e‖ / (‖r_e‖ σ_max(W_g[e])) (MPI
    Eq. 11, :func:`moealign.evaluation.diagnostics.projection_alignment`), W_g[e] =
    ``w1_EFD[e]``; ``rows="effective"``: R_eff of an :class:`MPIGate` (the stored rows of a
    stock gate), ``"raw"``: the stored rows R. Under expert parallelism each rank scores its
    own experts and the sums are all-reduced over the expert group (a collective)."""
    values = []
    for moe in moe_layers(model):
        gate, w1 = moe.router.gate, moe.routed_experts.inner_experts.w1_EFD
        rows_ED = (
            gate.effective_weight()
            if rows == "effective" and isinstance(gate, MPIGate)
            else gate.weight
        )
        rows_ED = rows_ED.full_tensor() if isinstance(rows_ED, DTensor) else rows_ED
        group = None
        if isinstance(w1, DTensor):
            for dim, placement in enumerate(w1.placements):
                if placement == Shard(0):
                    n_local = w1.to_local().shape[0]
                    first = w1.device_mesh.get_local_rank(dim) * n_local
                    rows_ED = rows_ED[first : first + n_local]
                    group = w1.device_mesh.get_group(dim)
            w1 = w1.full_tensor() if group is None else w1.to_local()
        total = diagnostics.projection_alignment(rows_ED, w1).sum()
        if group is not None:
            dist.all_reduce(total, group=group)
        values.append(float(total) / moe.router.num_experts)
    return values


def router_grad_norms(model: nn.Module) -> Tensor:
    """Per MoE layer ‖∇ router gate weight‖₂ (whole, also when sharded), as moealign's
    ``router_grad_norm``: call it after the backward and before clipping."""
    norms = []
    for moe in moe_layers(model):
        grad = moe.router.gate.weight.grad
        if grad is None:
            raise ValueError("router_grad_norms needs the gradients: call it after backward")
        grad = grad.full_tensor() if isinstance(grad, DTensor) else grad
        norms.append(torch.linalg.vector_norm(grad.double()))
    return torch.stack(norms).cpu()


def routing_summary(
    stats: RoutingStats,
    model: nn.Module,
    group: dist.ProcessGroup | None = None,
    grad_norms: Tensor | None = None,
) -> RoutingSummary:
    """The window's :class:`~moealign.evaluation.routing_stats.RoutingSummary`: ``stats`` summed
    over ``group`` (the ranks that saw different tokens: data- and expert-parallel; default
    the whole world), with the projection alignment λ′ (effective rows) and raw λ of
    ``model``'s weights and, when given, the :func:`router_grad_norms` (which a guardrail with
    ``grad_spike_factor`` reads). Every rank calls it (collectives)."""
    stats.reduce(partial(_reduce_sum, group=group))
    summary = stats.summary()
    for name, rows in (("projection_alignment", "effective"), ("projection_alignment_raw", "raw")):
        values = projection_alignments(model, rows)
        setattr(summary, name, torch.tensor(values, dtype=torch.float64))
    summary.router_grad_norm = grad_norms
    return summary


def routing_metrics(summary: RoutingSummary, prefix: str = "moe/") -> dict[str, float]:
    """The summary as torchtitan metrics (``MetricsProcessor.log(..., extra_metrics=...)`` or
    its ``logger.log(metrics, step)``): moealign's names (docs/routers.md, "Routing statistics"):
    ``max_vio``, ``max_vio_batch``, ``dead_experts``, ``usage_entropy``, ``token_entropy``,
    ``projection_alignment``, ``projection_alignment_raw``, ... as the mean over layers and per
    layer (``{prefix}layer{l}/{name}``), plus ``{prefix}utilisation_min``/``_max``."""
    metrics = summary.record(prefix)
    utilisation = summary.expert_utilisation
    metrics[f"{prefix}utilisation_min"] = float(utilisation.amin())
    metrics[f"{prefix}utilisation_max"] = float(utilisation.amax())
    return metrics


# --------------------------------------------------------------------------- checkpoints


def read_checkpoint(path: str | Path) -> dict[str, dict[str, Tensor]]:
    """The MoE weights of a torchtitan checkpoint, in moealign's layout (DESIGN.md §2, §10).

    ``path``: a DCP directory (torchtitan's ``step-N`` folder, model keys at the top level or
    under ``model.``) or a ``torch.save`` state dict file. Returns, per MoE module prefix (e.g.
    ``layers.0.moe``), ``router`` (E, D: the stored gate rows, R of an MPI gate or R_eff after
    :func:`precompute`), ``w_gate``/``w_up`` (E, F, D), ``w_down`` (E, D, F) and
    ``expert_bias`` when present: the tensors of :class:`moealign.nn.moe.MoELayer`'s
    ``router.weight``, ``experts.w_gate``/``w_up``/``w_down`` and ``router.expert_bias``.
    """
    path = Path(path)
    state = _read_dcp(path) if path.is_dir() else torch.load(path, map_location="cpu")
    layers: dict[str, dict[str, Tensor]] = {}
    for key, tensor in state.items():
        key = key.removeprefix("model.")
        for suffix, name in (
            *((f".routed_experts.inner_experts.{k}", v) for k, v in _EXPERT_KEYS.items()),
            (".router.gate.weight", "router"),
            (".expert_bias_E", "expert_bias"),
        ):
            if key.endswith(suffix):
                layers.setdefault(key.removesuffix(suffix), {})[name] = tensor
    if not layers:
        raise ValueError(f"{path}: no torchtitan MoE weights (…router.gate.weight) found")
    return layers


def moe_weights(moe: MoE) -> dict[str, Tensor]:
    """A live torchtitan ``MoE``'s weights under :func:`read_checkpoint`'s names (whole
    tensors, detached)."""
    experts = moe.routed_experts.inner_experts
    weights = {"router": moe.router.gate.weight}
    weights |= {name: getattr(experts, key) for key, name in _EXPERT_KEYS.items()}
    if moe.expert_bias_E is not None:
        weights["expert_bias"] = moe.expert_bias_E
    return {
        name: (w.full_tensor() if isinstance(w, DTensor) else w).detach()
        for name, w in weights.items()
    }


def to_moe_layer(
    weights: Mapping[str, Tensor], top_k: int, router: str = "mpi", **router_options
) -> MoELayer:
    """moealign's ``MoELayer`` holding one torchtitan MoE layer's ``weights`` (an entry of
    :func:`read_checkpoint` or :func:`moe_weights`); ``router`` and ``router_options`` as
    ``MoELayer``'s (``expert_bias`` is set when the weights hold one)."""
    n_experts, d_ff, d_model = weights["w_gate"].shape
    if "expert_bias" in weights:
        router_options.setdefault("expert_bias", True)
    layer = MoELayer(d_model, d_ff, n_experts, top_k, router=router, **router_options)
    with torch.no_grad():
        layer.router.weight.copy_(weights["router"])
        for name in _EXPERT_KEYS.values():
            getattr(layer.experts, name).copy_(weights[name])
        if "expert_bias" in weights and layer.router.expert_bias is not None:
            layer.router.expert_bias.copy_(weights["expert_bias"])
    return layer


def _read_dcp(path: Path) -> dict[str, Tensor]:
    """Every tensor of a DCP checkpoint directory, whole, on the CPU, in one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not (path / ".metadata").is_file():
        raise ValueError(f"{path}: not a DCP checkpoint directory (no .metadata file)")
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    state = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata)
    }
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    return state


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a torchtitan DCP checkpoint folder (``step-N``; model keys at the top level or under
    ``model.``) into ``model``, built from the configuration that trained it; returns it."""
    path = Path(path)
    state = {key.removeprefix("model."): t for key, t in _read_dcp(path).items()}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise ValueError(f"{path}: the checkpoint holds no {missing[:3]} of the model")
    model.load_state_dict({key: state[key] for key in own})
    return model


@torch.no_grad()
def export_hf(model: nn.Module, out_dir: str | Path, checkpoint: str | Path | None = None) -> Path:
    """Write torchtitan's Qwen3 MoE ``model`` (``Qwen3Model``; with ``checkpoint``, a DCP folder
    first loaded into it by :func:`load_checkpoint`) as a Hugging Face Qwen3-MoE folder:
    ``config.json`` (transformers' ``Qwen3MoeConfig`` built from the model) and
    ``model.safetensors`` (torchtitan's own ``Qwen3StateDictAdapter.to_hf``: one tensor per
    expert). ``AutoModelForCausalLM.from_pretrained(out_dir)`` then computes the same logits.

    An MPI model is exported as :func:`precompute` would make it (``model`` itself is left
    unchanged): the HF gate ``mlp.gate.weight`` holds R_eff = C · retract(power(R)) / τ, so HF's
    router routes every token as the MPI router did.

    HF's ``Qwen3MoeSparseMoeBlock`` scores softmax(x Wᵀ) over all experts, takes the top-K and,
    with ``norm_topk_prob``, renormalises them (torchtitan's ``route_norm``). Only what it
    expresses exactly is exported; a ``ValueError`` names the first option it cannot:
    ``score_func`` other than softmax, ``route_scale`` ≠ 1, group-limited routing
    (``num_expert_groups``), a non-zero ``expert_bias_E``, shared experts, dense layers, a
    gate or attention bias, RoPE other than ``CosSinRoPE`` without scaling, attention without
    QK norm, RMSNorm epsilons that differ, or MoE layers of different shapes. The attention
    mask is not a weight: HF's is causal (torchtitan's SDPA default). Returns ``out_dir``.
    """
    from torchtitan.models.qwen3.state_dict_adapter import Qwen3StateDictAdapter

    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    config = _hf_config(model)
    state = dict(model.state_dict())
    for name, module in model.named_modules():
        if isinstance(module, MPIGate):  # precompute's R_eff, without changing the model
            state[f"{name}.weight"] = module.effective_weight().to(module.weight.dtype)
    state = {k: (v.full_tensor() if isinstance(v, DTensor) else v).cpu() for k, v in state.items()}
    hf_state = Qwen3StateDictAdapter(model.config, None).to_hf(state)
    exported = sum(t.numel() for t in hf_state.values())
    expected = sum(p.numel() for p in model.parameters())  # a tied weight counts once
    if exported != expected:
        raise ValueError(
            f"torchtitan's Qwen3 adapter mapped {exported} of the model's {expected} weights: "
            "a module it does not know (not a Qwen3 MoE layout)"
        )
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    tensors = {k: t.detach().clone().contiguous() for k, t in hf_state.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _hf_config(model: nn.Module):
    """transformers' ``Qwen3MoeConfig`` of torchtitan's Qwen3 MoE ``model``, or a ValueError
    naming the first option HF's Qwen3-MoE cannot express (:func:`export_hf`)."""
    from transformers import Qwen3MoeConfig

    def refuse(option: str, value, accepted: str) -> NoReturn:
        raise ValueError(
            f"{option}={value!r} cannot be exported to Hugging Face Qwen3-MoE; "
            f"it accepts {accepted}"
        )

    blocks = list(model.layers.values())
    shapes = set()
    for index, block in enumerate(blocks):
        moe = getattr(block, "moe", None)
        if moe is None:
            refuse(f"layers.{index}.feed_forward", "dense layer", "MoE layers only")
        router, experts = moe.router, moe.routed_experts.inner_experts
        for option, value, ok, accepted in (
            ("score_func", router.score_func, router.score_func == "softmax", "'softmax'"),
            ("route_scale", router.route_scale, router.route_scale == 1.0, "1.0"),
            (
                "num_expert_groups",
                router.num_expert_groups,
                router.num_expert_groups is None,
                "None",
            ),
            ("shared_experts", "set", moe.shared_experts is None, "None"),
            ("router.gate.bias", "set", router.gate.bias is None, "no bias"),
            (
                "expert_bias_E",
                "non-zero",
                moe.expert_bias_E is None or not bool(moe.expert_bias_E.any()),
                "None or zeros (HF selects by the scores alone)",
            ),
        ):
            if not ok:
                refuse(f"layers.{index}.moe.{option}", value, accepted)
        shapes.add((router.num_experts, router.top_k, experts.w1_EFD.shape[1], router.route_norm))
    if len(shapes) != 1:
        refuse("moe", sorted(shapes), "one (num_experts, top_k, hidden_dim, route_norm) for all")
    ((n_experts, top_k, hidden, route_norm),) = shapes
    attention = blocks[0].attention
    rope = attention.rope
    if type(rope) is not CosSinRoPE or rope.config.scaling != "none":
        refuse("rope", f"{type(rope).__name__}/{rope.config.scaling}", "CosSinRoPE, scaling 'none'")
    if attention.q_norm is None:
        refuse("attention.qk_norm", None, "an RMSNorm (Qwen3's QK norm)")
    biases = [name for name, _ in model.named_parameters() if name.endswith(".bias")]
    if biases:
        refuse(biases[0], "set", "no bias")
    eps = {m.eps for m in model.modules() if isinstance(m, nn.RMSNorm)}
    if len(eps) != 1:
        refuse("RMSNorm eps", sorted(eps), "one value for every norm")
    config = Qwen3MoeConfig(
        vocab_size=model.config.vocab_size,
        hidden_size=model.config.dim,
        intermediate_size=hidden,  # dense MLP width: unused, every layer is MoE
        num_hidden_layers=len(blocks),
        num_attention_heads=attention.n_heads,
        num_key_value_heads=attention.n_kv_heads,
        hidden_act="silu",
        max_position_embeddings=rope.config.max_seq_len,
        rms_norm_eps=eps.pop(),
        tie_word_embeddings=model.config.enable_weight_tying,
        rope_parameters={"rope_type": "default", "rope_theta": rope.config.theta},
        attention_bias=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        moe_intermediate_size=hidden,
        num_experts_per_tok=top_k,
        num_experts=n_experts,
        norm_topk_prob=route_norm,
        architectures=["Qwen3MoeForCausalLM"],
        dtype=model.lm_head.weight.dtype,
    )
    config.head_dim = attention.head_dim  # read by HF's attention, saved in config.json
    return config
