"""MPI routing, routing alignment and routing statistics inside Megatron-Core (issue 22).

Tested with ``megatron-core==0.16.1`` (extra ``moealign[megatron]``); ``docs/engines.md``
("Megatron-Core") has the recipe. Three pieces, each in Megatron's own types:

* :func:`mpi_router` returns a ``RouterBuilder`` for ``MoESubmodules(router=...)``. It builds
  :class:`MPITopKRouter`, a ``TopKRouter`` whose gating uses the MPI rows (DESIGN.md §3)

      R_eff = s · retract(A_eᵀ A_e r_e),   s = C/τ,  C = c_prime/√E  (or ``logit_scale``),

  computed from the layer's own experts every forward (A_e: the gate half of ``linear_fc1``,
  i.e. the matrix fed to SiLU; or the up half, or ``linear_fc2``ᵀ). Everything after the logits
  is ``TopKRouter``'s own code: top-k, score function and normalisation, expert bias, capacity,
  z-loss and the balance losses through ``MoEAuxLossAutoScaler``. ``logit_scale=0.125``
  reproduces the authors' released code (a fixed C). The experts are built after the router,
  so :func:`bind_experts` (once, after the model is built) gives each router its layer's
  experts. The rows use moealign's :func:`~moealign.nn.routers.mpi_rows`, the same function as
  moealign's ``MPIRouter``.
* Expert parallelism: each rank powers the rows of its own experts and the E × D R_eff is
  all-gathered over the expert-parallel group (autograd-aware: each rank's gradient of R lands
  in its own rows and Megatron's data-parallel reduction of the replicated router sums them).
  Expert tensor parallelism: A_e is split by rows (F) over the expert-TP group, so the partial
  power steps A_eⁱᵀ(A_eⁱ r_e) are all-reduced (autograd-aware) into u_e before retraction.
* :class:`RoutingRecorder` adds moealign's routing alignment term (DESIGN.md §4; the λ schedule,
  prior and guardrail handles of :class:`~moealign.alignment.term.RoutingAlignment`) to each
  MoE layer's logits through ``MoEAuxLossAutoScaler`` (Megatron's aux-loss path; task ids come
  from the batch) and gathers moealign's routing statistics
  (:class:`~moealign.evaluation.routing_stats.RoutingStats`), reduced over the data- and
  expert-parallel ranks and written to Megatron's MoE metrics tracker.
* :func:`to_moealign_layer` reads a Megatron ``MoELayer``'s weights into moealign's
  ``MoELayer`` (its router kind and options included), for moealign's diagnostics and tools.
* :func:`precompute` replaces every MPI router by Megatron's unmodified ``TopKRouter`` holding
  R_eff, so the checkpoint loads in stock Megatron and routes every token as before (the same
  gating computation on the same rows: bit for bit).

What needs CUDA in megatron-core 0.16.1 (their code, not ours): ``TopKRouter.gating`` moves its
weight to ``torch.cuda.current_device()`` and its ``router_gating_linear`` needs Transformer
Engine (without it ``te_general_gemm`` is undefined), so the stock router after
:func:`precompute` runs on CUDA with TE only (:class:`MPITopKRouter` overrides ``gating`` and
runs anywhere);
``moe_router_enable_expert_bias`` and the ``global_aux_loss`` allocate their buffers on
``torch.cuda.current_device()`` in ``TopKRouter.__init__``; the ``alltoall`` dispatcher creates a
``torch.cuda.Stream``; ``GroupedMLP`` runs the ``grouped_gemm`` CUDA kernels and ``TEGroupedMLP``
needs Transformer Engine. The ``allgather`` dispatcher with ``SequentialMLP`` runs on the CPU.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.distributed.nn.functional as dist_nn
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.experts import GroupedMLP, SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer, RouterBuilder
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    apply_random_logits,
    get_default_pg_collection,
    router_gating_linear,
    save_to_aux_losses_tracker,
)
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor, nn

from moealign.alignment.loss import routing_alignment_loss
from moealign.alignment.term import RoutingAlignment
from moealign.evaluation import diagnostics
from moealign.evaluation.routing_stats import RoutingStats, RoutingSummary
from moealign.nn import moe
from moealign.nn.losses import load_balance_loss, z_loss
from moealign.nn.moe import RoutingInfo
from moealign.nn.routers import MPI_EXPERT_MATRICES, OptionError, mpi_rows

__all__ = [
    "MPITopKRouter",
    "RoutingRecorder",
    "bind_experts",
    "drive_matrix",
    "mpi_router",
    "mpi_routers",
    "precompute",
    "to_moealign_layer",
]


def mpi_router(**mpi_options) -> RouterBuilder:
    """A ``RouterBuilder`` for ``MoESubmodules(router=mpi_router(...))``.

    Options (moealign's ``MPIRouter`` options, DESIGN.md §3): ``c_prime`` (4.0),
    ``power_steps`` (1), ``retract`` (True), ``power`` (True), ``detach_experts`` (False),
    ``expert_matrix`` (``gate``, ``up`` or ``down``), ``temperature`` (1.0), and
    ``logit_scale`` (None: C = c_prime/√E; a float fixes C, 0.125 in the authors' code). Top-k,
    score function, expert bias, z-loss and balance losses come from the ``TransformerConfig``
    as for ``TopKRouter``. Unknown or out-of-range options raise :class:`OptionError` here.
    """
    unknown = set(mpi_options) - set(MPITopKRouter.DEFAULTS)
    if unknown:
        raise OptionError(
            ", ".join(sorted(unknown)), "given", f"options among {sorted(MPITopKRouter.DEFAULTS)}"
        )
    _check_options(MPITopKRouter.DEFAULTS | mpi_options)
    return functools.partial(MPITopKRouter, **mpi_options)


def _check_options(options: dict) -> None:
    checks = {
        "c_prime": (options["c_prime"] > 0, "a float > 0"),
        "power_steps": (
            isinstance(options["power_steps"], int) and options["power_steps"] >= 1,
            "an integer >= 1",
        ),
        "expert_matrix": (
            options["expert_matrix"] in MPI_EXPERT_MATRICES,
            f"one of {MPI_EXPERT_MATRICES}",
        ),
        "temperature": (options["temperature"] > 0, "a float > 0"),
        "logit_scale": (
            options["logit_scale"] is None or options["logit_scale"] > 0,
            "None (C = c_prime/sqrt(E)) or a float > 0",
        ),
    }
    for name, (ok, accepted) in checks.items():
        if not ok:
            raise OptionError(name, options[name], accepted)


def drive_matrix(experts: nn.Module, which: str = "gate") -> Tensor:
    """The local experts' (X, F_local, D) drive matrices A of the MPI power step.

    ``gate``: the first half of each expert's fc1 output rows (Megatron's GLU feeds
    ``chunk(fc1(x), 2)[0]`` to the activation); ``up``: the second half; ``down``: fc2's
    weight transposed, (F, D). Layouts: ``SequentialMLP`` (``local_experts[i].linear_fc1.weight``
    (2F, D), ``linear_fc2.weight`` (D, F)), ``GroupedMLP`` (``weight1`` (D, X·2F) and
    ``weight2`` (X·F, D), read as its forward reads them: ``weight1.view(X, D, 2F)[e]`` and
    ``weight2.view(X, F, D)[e]`` multiply from the right) and ``TEGroupedMLP``
    (``linear_fc1.weight{i}`` (2F, D), ``linear_fc2.weight{i}`` (D, F)). Under expert tensor
    parallelism these are the local rows. Only ``SequentialMLP`` runs without CUDA in 0.16.1
    (``GroupedMLP`` needs ``grouped_gemm``, ``TEGroupedMLP`` Transformer Engine), so the other
    two readers follow the layouts in Megatron's code and are not run by the tests.
    """
    if which not in MPI_EXPERT_MATRICES:
        raise OptionError("expert_matrix", which, f"one of {MPI_EXPERT_MATRICES}")
    if isinstance(experts, SequentialMLP):
        fc1 = [expert.linear_fc1.weight for expert in experts.local_experts]
        fc2 = [expert.linear_fc2.weight for expert in experts.local_experts]
    elif isinstance(experts, GroupedMLP):
        n_local, d_model = experts.num_local_experts, experts.config.hidden_size
        fc1 = list(experts.weight1.view(n_local, d_model, -1).transpose(1, 2))
        fc2 = list(experts.weight2.view(n_local, -1, d_model).transpose(1, 2))
    elif hasattr(experts, "linear_fc1") and hasattr(experts.linear_fc1, "weight0"):
        n_local = experts.num_local_experts  # TEGroupedMLP (Transformer Engine)
        fc1 = [getattr(experts.linear_fc1, f"weight{i}") for i in range(n_local)]
        fc2 = [getattr(experts.linear_fc2, f"weight{i}") for i in range(n_local)]
    else:
        raise TypeError(
            f"experts of type {type(experts).__name__} are not accepted; expected "
            "SequentialMLP, GroupedMLP or TEGroupedMLP"
        )
    if which == "down":
        return torch.stack([weight.t() for weight in fc2])
    if not experts.config.gated_linear_unit:
        raise ValueError(
            f"expert_matrix={which!r} needs gated experts (TransformerConfig.gated_linear_unit)"
        )
    half = 0 if which == "gate" else 1
    return torch.stack([weight.chunk(2, dim=0)[half] for weight in fc1])


class MPITopKRouter(TopKRouter):
    """Megatron's ``TopKRouter`` with MPI gating (module docstring; DESIGN.md §3).

    The router parameter ``weight`` (E, D) is R, never overwritten; logits are
    :func:`gating_linear` (x, R_eff, bias, router_dtype), the computation ``TopKRouter.gating``
    makes with its own weight, so :func:`precompute` is exact. State dict keys are
    ``TopKRouter``'s.
    """

    DEFAULTS = dict(
        c_prime=4.0,
        power_steps=1,
        retract=True,
        power=True,
        detach_experts=False,
        expert_matrix="gate",
        temperature=1.0,
        logit_scale=None,
    )

    def __init__(
        self,
        config: TransformerConfig,
        pg_collection: ProcessGroupCollection | None = None,
        **mpi_options,
    ) -> None:
        pg_collection = pg_collection or get_default_pg_collection()
        super().__init__(config=config, pg_collection=pg_collection)
        options = self.DEFAULTS | mpi_options
        _check_options(options)
        self.mpi_options = options
        self.pg_collection = pg_collection
        self.ep_group, self.expt_tp_group = pg_collection.ep, pg_collection.expt_tp
        n_local = self.num_experts // self.ep_group.size()
        first = self.ep_group.rank() * n_local
        self.local_rows = slice(first, first + n_local)
        self._experts: tuple[nn.Module, ...] = ()  # a tuple: not a submodule of the router
        self.recorder: RoutingRecorder | None = None

    @property
    def scale(self) -> float:
        """s = C/τ with C = ``logit_scale`` or c_prime/√E (the paper's C′/√E, DESIGN.md §3)."""
        options = self.mpi_options
        scale = options["logit_scale"] or options["c_prime"] / math.sqrt(self.num_experts)
        return scale / options["temperature"]

    def bind(self, experts: nn.Module) -> None:
        """Route with these experts' matrices (the layer's ``experts``, :func:`bind_experts`)."""
        drive_matrix(experts, self.mpi_options["expert_matrix"])  # checks the layout now
        self._experts = (experts,)

    @property
    def experts(self) -> nn.Module:
        if not self._experts:
            raise RuntimeError(
                "the MPI router has no experts: call moealign.engines.megatron.bind_experts("
                "model) once after building the model"
            )
        return self._experts[0]

    def effective_weight(self) -> Tensor:
        """R_eff (E, D), fp32: this rank's rows powered with its local experts, all-gathered
        over the expert-parallel group; partial power steps summed over expert TP."""
        options = self.mpi_options
        sum_partial = None
        if self.expt_tp_group.size() > 1:
            sum_partial = functools.partial(dist_nn.all_reduce, group=self.expt_tp_group)
        local_XD = mpi_rows(
            self.weight[self.local_rows],
            drive_matrix(self.experts, options["expert_matrix"]),
            scale=self.scale,
            power_steps=options["power_steps"],
            retract=options["retract"],
            power=options["power"],
            detach_experts=options["detach_experts"],
            sum_partial=sum_partial,
        )
        if self.ep_group.size() == 1:
            return local_XD
        return funcol.all_gather_single_autograd(local_XD.contiguous(), 0, self.ep_group)

    def gating(self, input: Tensor) -> Tensor:
        router_dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(
            self.config.moe_router_dtype, input.dtype
        )
        return gating_linear(input, self.effective_weight(), self.bias, router_dtype)

    def forward(self, input: Tensor, padding_mask: Tensor | None = None):
        """``TopKRouter.forward`` with the recorder's alignment term and statistics."""
        self._maintain_float32_expert_bias()
        logits = self.gating(self.apply_input_jitter(input))
        if self.config.moe_router_force_load_balancing:
            logits = apply_random_logits(logits)
        if self.recorder is not None:
            logits = self.recorder.attach_alignment(self, logits)
        probs, routing_map = self.routing(logits, padding_mask=padding_mask)
        if self.recorder is not None:
            self.recorder.record(self, logits, routing_map)
        return probs, routing_map


def gating_linear(input: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """The router logits x Wᵀ (+ b) in ``dtype``, as ``TopKRouter.gating`` computes them:
    Megatron's ``router_gating_linear`` where Transformer Engine is installed; without it,
    0.16.1's ``router_gating_linear`` fails (``te_general_gemm`` is then undefined in
    ``moe_utils``), so the same ``torch.mm``/``torch.addmm`` in ``dtype`` as its fallback
    branch."""
    if moe_utils.__dict__.get("te_general_gemm") is not None:
        return router_gating_linear(input, weight, bias, dtype)
    input_TD = input.reshape(-1, input.shape[-1]).to(dtype)
    if bias is None:
        logits = torch.mm(input_TD, weight.to(dtype).t())
    else:
        logits = torch.addmm(bias.to(dtype), input_TD, weight.to(dtype).t())
    return logits.view(*input.shape[:-1], weight.shape[0])


def _moe_layers(model: nn.Module) -> list[MoELayer]:
    return [module for module in model.modules() if isinstance(module, MoELayer)]


def mpi_routers(model: nn.Module) -> list[MPITopKRouter]:
    """The MPI routers of ``model``'s MoE layers, in module order."""
    return [layer.router for layer in _moe_layers(model) if isinstance(layer.router, MPITopKRouter)]


def bind_experts(model: nn.Module) -> int:
    """Give every MPI router of ``model`` its own layer's experts (call once after building the
    model, before the first forward). Returns the number of routers bound."""
    routers = 0
    for layer in _moe_layers(model):
        if isinstance(layer.router, MPITopKRouter):
            layer.router.bind(layer.experts)
            routers += 1
    return routers


@torch.no_grad()
def precompute(model: nn.Module) -> int:
    """Replace every MPI router by Megatron's unmodified ``TopKRouter`` holding R_eff (with the
    router's bias and expert bias), in place; returns the number replaced. The model then saves
    and loads as a stock Megatron model and routes every token as the MPI router did (the same
    gating call on the same rows). Built under a forked RNG: the run's random stream is
    untouched."""
    replaced = 0
    for layer in _moe_layers(model):
        router = layer.router
        if not isinstance(router, MPITopKRouter):
            continue
        weight = router.effective_weight()
        with torch.random.fork_rng(devices=[]):
            stock = TopKRouter(config=router.config, pg_collection=router.pg_collection)
        stock.weight.data = weight.detach().clone().to(router.weight.device)
        for name in ("bias", "expert_bias"):
            if getattr(router, name, None) is not None:
                getattr(stock, name).data.copy_(getattr(router, name))
        stock.set_layer_number(router.layer_number)
        stock.train(router.training)
        layer.router = stock
        replaced += 1
    return replaced


def to_moealign_layer(layer: MoELayer) -> moe.MoELayer:
    """moealign's ``MoELayer`` holding a Megatron ``MoELayer``'s weights (one process: no
    expert or expert-tensor parallelism), for moealign's diagnostics and tools.

    Experts: W_gate/W_up the halves of ``linear_fc1`` (:func:`drive_matrix`), W_down
    ``linear_fc2``. Router: :class:`MPITopKRouter` → ``mpi`` with the same options (a fixed
    ``logit_scale`` C becomes ``c_prime`` = C·√E); ``TopKRouter`` (e.g. after
    :func:`precompute`) → ``softmax_topk`` with its weight. ``moe_router_pre_softmax`` (weights
    from the full softmax, not renormalised) maps to ``normalize_topk=False``; the expert bias
    is copied. Only the softmax score function without group-limited routing, bias or capacity
    has a moealign equivalent; other configurations raise ValueError.
    """
    router, config = layer.router, layer.config
    if layer.ep_group.size() > 1 or layer.experts.tp_group.size() > 1:
        raise ValueError("to_moealign_layer needs the whole layer in one process (EP = ETP = 1)")
    unsupported = {
        "moe_router_score_function": config.moe_router_score_function != "softmax",
        "moe_router_num_groups": bool(config.moe_router_num_groups),
        "moe_expert_capacity_factor": config.moe_expert_capacity_factor is not None,
        "add_bias_linear": router.bias is not None,
        "moe_router_topk_scaling_factor": config.moe_router_topk_scaling_factor not in (None, 1.0),
    }
    for name, bad in unsupported.items():
        if bad:
            raise ValueError(f"{name}={getattr(config, name)!r} has no moealign equivalent")
    options: dict = {
        "normalize_topk": not config.moe_router_pre_softmax,
        "expert_bias": router.expert_bias is not None,
    }
    kind = "softmax_topk"
    if isinstance(router, MPITopKRouter):
        kind = "mpi"
        options |= {k: v for k, v in router.mpi_options.items() if k != "logit_scale"}
        if router.mpi_options["logit_scale"] is not None:
            options["c_prime"] = router.mpi_options["logit_scale"] * math.sqrt(router.num_experts)
    twin = moe.MoELayer(
        config.hidden_size,
        config.moe_ffn_hidden_size,
        config.num_moe_experts,
        config.moe_router_topk,
        router=kind,
        **options,
    )
    with torch.no_grad():
        twin.router.weight.copy_(router.weight)
        if router.expert_bias is not None:
            twin.router.expert_bias.copy_(router.expert_bias)
        twin.experts.w_gate.copy_(drive_matrix(layer.experts, "gate"))
        twin.experts.w_up.copy_(drive_matrix(layer.experts, "up"))
        twin.experts.w_down.copy_(drive_matrix(layer.experts, "down").transpose(1, 2))
    return twin.to(router.weight.device)


def _num_layers(config: TransformerConfig) -> int:
    return config.num_layers + (config.mtp_num_layers or 0)


class RoutingRecorder:
    """moealign's routing alignment term and routing statistics for the MPI routers of a
    Megatron model (module docstring).

    ``recorder = RoutingRecorder(model, alignment=..., task_names=...)`` attaches itself to
    every :class:`MPITopKRouter`. Each micro-batch: ``recorder.begin_micro_batch(step,
    task_ids)`` with the batch's task ids, shape [B, S] like Megatron's ``tokens`` (−1 = no
    task), before the forward. Each optimizer step: ``summary = recorder.end_step()``.

    * Alignment (DESIGN.md §4): with L MoE layers, L_align = mean_τ Σ_l KL(p_l(·|τ) ‖ q_l)
      = Σ_l [Σ_τ KL(p_l(·|τ) ‖ q_l) / N], so each layer attaches its own share
      λ(t) · Σ_τ KL_l / N (minus γ·H_l/L with the guardrail's entropy bonus γ) to its logits
      through ``MoEAuxLossAutoScaler``, as Megatron does its z-loss; the gradient is that of
      λ(t)·L_align, scaled like Megatron's aux losses. The unweighted per-layer KL is tracked as
      ``align_kl``. λ(t), the prior (uniform / marginal / file) and the guardrail handles are
      those of the given :class:`RoutingAlignment`.
    * Statistics: each training forward's routing (full softmax, top-k from the routing map) is
      added to a :class:`RoutingStats` window; :meth:`end_step` sums the window over the
      tensor-, data- and context-parallel ranks of the routers' ``tp_dp_cp`` group (every rank
      that routes distinct tokens, expert-parallel ranks included; one all-reduce), adds the
      projection alignment of the effective rows (λ′) and of R (raw λ), averaged over all E
      experts across the expert-parallel group, and writes every statistic per layer to
      Megatron's MoE metrics tracker under moealign's names (``max_vio``, ``max_vio_batch``,
      ``dead_experts``, ``usage_entropy``, ``token_entropy``, ``task_entropy``,
      ``projection_alignment``, ``projection_alignment_raw``; Megatron tracks its own
      ``load_balancing_loss`` and ``z_loss``, which the summary holds too),
      multiplied by this rank's micro-batch count, so that ``track_moe_metrics`` with Megatron's
      ``loss_scale = 1/num_microbatches`` reports the values themselves. The returned
      :class:`RoutingSummary` (also with the per-expert ``expert_utilisation``) is what
      moealign's guardrails read.

    The routers must see the batch's own tokens: context parallelism and sequence parallelism
    (which split the sequence before the router) are not supported by the alignment term.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        alignment: RoutingAlignment | None = None,
        task_names: Sequence[str] = (),
    ):
        self.routers = mpi_routers(model)
        if not self.routers:
            raise ValueError("the model has no MPI router: build its MoE layers with mpi_router()")
        for router in self.routers:
            router.recorder = self
        self.index = {id(router): i for i, router in enumerate(self.routers)}
        self.alignment = alignment
        self.n_experts = self.routers[0].num_experts
        device = self.routers[0].weight.device
        self.stats = RoutingStats(
            len(self.routers), self.n_experts, task_names=task_names, device=device
        )
        self.step = 0
        self.task_ids_T: Tensor | None = None
        self.micro_batches = 0
        self._pending: dict[int, RoutingInfo] = {}

    def begin_micro_batch(self, step: int, task_ids: Tensor | None = None) -> None:
        """The optimizer step t (for λ(t)) and the task id of every token, [B, S]."""
        self.step = step
        self.task_ids_T = None if task_ids is None else task_ids.transpose(0, 1).reshape(-1)

    def _task_ids(self) -> Tensor:
        if self.task_ids_T is None:
            raise ValueError(
                "routing alignment needs task ids: call recorder.begin_micro_batch(step, "
                "task_ids) with the batch's [B, S] task ids before the forward"
            )
        return self.task_ids_T

    def attach_alignment(self, router: MPITopKRouter, logits: Tensor) -> Tensor:
        """``logits`` with this layer's share of λ(t)·L_align attached (training only)."""
        alignment = self.alignment
        if alignment is None or not (router.training and torch.is_grad_enabled()):
            return logits
        layer = self.index[id(router)]
        logits_TE = logits.view(-1, self.n_experts)
        probs_TE = torch.softmax(logits_TE.float(), dim=-1)
        prior = alignment.prior.value(logits.device)[layer : layer + 1]
        kl = routing_alignment_loss([probs_TE], self._task_ids(), prior)
        loss = alignment.weight(self.step) * kl
        if alignment.entropy_bonus > 0:
            bonus = alignment.entropy_bonus * diagnostics.token_entropy(probs_TE)
            loss = loss - bonus / len(self.routers)
        if router.calculate_per_token_loss:  # Megatron's convention for its own aux losses
            loss = loss * logits_TE.shape[0]
        save_to_aux_losses_tracker(
            "align_kl", kl.detach(), router.layer_number, _num_layers(router.config)
        )
        return MoEAuxLossAutoScaler.apply(logits, loss)

    @torch.no_grad()
    def record(self, router: MPITopKRouter, logits: Tensor, routing_map: Tensor) -> None:
        """Keep one layer's routing of a training forward; once every layer has routed the
        micro-batch, add it to the statistics window (and to the marginal prior's sums)."""
        if not router.training:
            return
        logits_TE = logits.detach().view(-1, self.n_experts).float()
        probs_TE = torch.softmax(logits_TE, dim=-1)
        top_k = router.topk
        topk_idx_TK = routing_map.float().topk(top_k, dim=-1).indices
        counts_E = routing_map.sum(0).float()
        self._pending[self.index[id(router)]] = RoutingInfo(
            logits=logits_TE,
            probs=probs_TE,
            topk_idx=topk_idx_TK,
            topk_weight=probs_TE.gather(-1, topk_idx_TK),
            keep=None,
            expert_counts=counts_E,
            load_balance_loss=load_balance_loss(probs_TE, topk_idx_TK, self.n_experts),
            z_loss=z_loss(logits_TE),
        )
        if len(self._pending) == len(self.routers):
            routing = [self._pending[i] for i in range(len(self.routers))]
            self._pending = {}
            self.stats.add(routing, self.task_ids_T)
            self.micro_batches += 1
            if self.alignment is not None and self.task_ids_T is not None:
                self.alignment.prior.accumulate([info.probs for info in routing], self.task_ids_T)

    @torch.no_grad()
    def projection_alignment(self) -> tuple[Tensor, Tensor]:
        """Per layer the mean over all E experts of λ_e (MPI Eq. 11, DESIGN.md §3) for the
        effective rows R_eff and for R, each against the gate matrix W_g[e] (gathered over
        expert TP); the sums over local experts are added over the expert-parallel group."""
        sums = []
        for router in self.routers:
            gate_XFD = drive_matrix(router.experts, "gate")
            if router.expt_tp_group.size() > 1:
                gate_XFD = torch.cat(dist_nn.all_gather(gate_XFD, group=router.expt_tp_group), 1)
            effective = router.effective_weight()[router.local_rows]
            raw = router.weight[router.local_rows]
            sums.append(
                torch.stack(
                    [
                        diagnostics.projection_alignment(effective, gate_XFD).sum(),
                        diagnostics.projection_alignment(raw, gate_XFD).sum(),
                    ]
                )
            )
        sums_L2 = torch.stack(sums)
        group = self.routers[0].ep_group
        if group.size() > 1:
            dist.all_reduce(sums_L2, group=group)
        means_L2 = sums_L2.cpu() / self.n_experts
        return means_L2[:, 0], means_L2[:, 1]

    def end_step(self, applied: bool = True) -> RoutingSummary:
        """Close the optimizer step's window (a collective on every rank): reduce, summarise,
        write to Megatron's MoE metrics tracker, step the marginal prior (``applied=False``:
        a skipped step leaves it unchanged) and start a new window."""
        group = self.routers[0].tp_dp_cp_group

        def reduce_sum(tensor: Tensor) -> Tensor:
            if group.size() > 1:
                dist.all_reduce(tensor, group=group)
            return tensor

        self.stats.reduce(reduce_sum)
        summary = self.stats.summary()
        summary.projection_alignment, summary.projection_alignment_raw = self.projection_alignment()
        for name, value_L in summary.per_layer().items():
            if "/" in name or name in ("balance_loss", "z_loss"):
                continue  # Megatron tracks its own balance and z-losses; tasks: the summary
            for router, value in zip(self.routers, value_L.tolist(), strict=True):
                save_to_aux_losses_tracker(
                    name,
                    torch.tensor(value * self.micro_batches, device=router.weight.device),
                    router.layer_number,
                    _num_layers(router.config),
                )
        if self.alignment is not None:
            self.alignment.end_step(reduce_sum, applied)
        self.stats = RoutingStats(
            self.stats.n_layers,
            self.n_experts,
            task_names=self.stats.task_names,
            device=self.stats.buffer.device,
        )
        self.micro_batches = 0
        return summary
