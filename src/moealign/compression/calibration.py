"""Calibration statistics of every MoE layer (research-compression.md §0, §6).

One pass of the *uncompressed* model over calibration batches records each MoE layer's inputs
X (T, D) (forward pre-hooks; padding excluded). From X and the layer itself,
:class:`LayerCalibration` gives, for T calibration tokens, E experts and top-k K:

* router logits H (T, E) (after temperature; MPI: C · ⟨x, r'_e⟩) and the layer's own top-k S_t;
* frequency f_e = #{t : e ∈ S_t, slot kept} / #kept slots and soft score
  a_e = mean_t softmax(H_t)_e; with a router ``capacity_factor`` the slots its capacity drops
  (per calibration batch, as in the model's forward) are not counted;
* every expert's output on every token E_e(x_t) (E, T, D) and the per-token output cosine
  Sim(i, j) = mean_t cos(E_i(x_t), E_j(x_t));
* the router-logit cosine cos(H[:, i], H[:, j]);
* the layer's routed output Z_D = Σ_e g_te(D) E_e(x_t) with the experts D dropped from the
  softmax (logits −∞, i.e. the R1 slice of §4), re-selected top-k and renormalised weights,
  and the capacity of the pruned router (E′ experts) applied per batch.

Every method reads X from the original model ("layerwise" in NAEE's terms, §4): a layer's
statistics do not see the compression of the layers before it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moealign.compression.layers import MoELayerView, expert_outputs, is_hf_model, moe_layer_views
from moealign.nn.routers import capacity_keep_mask


def capacity_slots(
    index_TK: Tensor, n_experts: int, capacity_factor: float | None, batch_tokens: Sequence[int]
) -> Tensor | None:
    """(T, K) bool: the slots a router with ``capacity_factor`` keeps, batch by batch
    (``batch_tokens`` consecutive tokens each, as the model's forwards saw them;
    :func:`moealign.nn.routers.capacity_keep_mask` with ``n_experts`` experts); None without a
    capacity factor. ``index_TK`` holds expert ids in 0..n_experts − 1."""
    if capacity_factor is None:
        return None
    chunks = index_TK.split(list(batch_tokens))
    return torch.cat([capacity_keep_mask(c, n_experts, capacity_factor) for c in chunks])


def dense_gates(
    logits_TE: Tensor,
    top_k: int,
    normalize: bool,
    selection_bias_E: Tensor | None = None,
    keep_E: Tensor | None = None,
    capacity_factor: float | None = None,
    batch_tokens: Sequence[int] | None = None,
) -> Tensor:
    """The (T, E) gate matrix g of a softmax top-k router: p = softmax(logits) over the kept
    experts (``keep_E`` bool; dropped logits are −∞), S = top-k of logits + bias, g_te = p_te
    for e ∈ S (renormalised over S when ``normalize``), 0 elsewhere (DESIGN.md §2). With a
    ``capacity_factor``, the slots the capacity of a router with the kept experts drops
    (:func:`capacity_slots` per batch of ``batch_tokens``, default one batch) get g = 0, as the
    router zeroes their weight."""
    if keep_E is not None:
        logits_TE = logits_TE.masked_fill(~keep_E, float("-inf"))
    probs_TE = torch.softmax(logits_TE, dim=-1)
    selection_TE = logits_TE if selection_bias_E is None else logits_TE + selection_bias_E
    index_TK = torch.topk(selection_TE, top_k, dim=-1).indices
    weight_TK = probs_TE.gather(-1, index_TK)
    if normalize:
        weight_TK = weight_TK / weight_TK.sum(-1, keepdim=True)
    if capacity_factor is not None:
        # The pruned router numbers its E′ experts 0..E′−1 in index order.
        renumber_E = torch.arange(logits_TE.shape[-1], device=index_TK.device)
        n_kept = logits_TE.shape[-1]
        if keep_E is not None:
            renumber_E = keep_E.long().cumsum(0) - 1
            n_kept = int(keep_E.sum())
        tokens = [logits_TE.shape[0]] if batch_tokens is None else batch_tokens
        kept_TK = capacity_slots(renumber_E[index_TK], n_kept, capacity_factor, tokens)
        weight_TK = weight_TK * kept_TK
    return torch.zeros_like(probs_TE).scatter_(-1, index_TK, weight_TK)


@dataclass
class LayerCalibration:
    """One MoE layer's calibration statistics (module docstring); ``batch_tokens`` are the
    tokens of each calibration batch, in order (NAEE sums its error per batch)."""

    view: MoELayerView
    inputs_TD: Tensor
    batch_tokens: list[int]
    logits_TE: Tensor = field(init=False)
    topk_idx_TK: Tensor = field(init=False)
    kept_TK: Tensor | None = field(init=False)

    def __post_init__(self) -> None:
        if self.inputs_TD.shape[0] == 0:
            raise ValueError(f"{self.view.name}: no calibration tokens reached this layer")
        with torch.no_grad():
            self.logits_TE, self.topk_idx_TK = self.view.route(self.inputs_TD)
        self.kept_TK = capacity_slots(
            self.topk_idx_TK, self.view.n_experts, self.view.capacity_factor, self.batch_tokens
        )

    @property
    def n_tokens(self) -> int:
        return self.inputs_TD.shape[0]

    @cached_property
    def counts(self) -> Tensor:
        """(E,) int64: top-k slots each expert received (slots dropped by capacity left out)."""
        index = self.topk_idx_TK if self.kept_TK is None else self.topk_idx_TK[self.kept_TK]
        return torch.bincount(index.reshape(-1), minlength=self.view.n_experts).cpu()

    @property
    def frequencies(self) -> Tensor:
        """f_e = counts_e / Σ counts (the kept slots), float64 (sums to 1)."""
        return self.counts.double() / self.counts.sum().clamp_min(1)

    @property
    def soft_scores(self) -> Tensor:
        """a_e = mean_t softmax(H_t)_e, float64."""
        return torch.softmax(self.logits_TE.double(), dim=-1).mean(0).cpu()

    @cached_property
    def outputs_ETD(self) -> Tensor:
        """E_e(x_t), (E, T, D), fp32 or wider."""
        with torch.no_grad():
            return expert_outputs(self.view.weights, self.view.activation, self.inputs_TD)

    @property
    def output_similarity(self) -> Tensor:
        """Sim(i, j) = mean_t cos(E_i(x_t), E_j(x_t)), (E, E), float64."""
        unit_ETD = F.normalize(self.outputs_ETD.double(), dim=-1)
        return torch.einsum("itd,jtd->ij", unit_ETD, unit_ETD).cpu() / self.n_tokens

    @property
    def logit_similarity(self) -> Tensor:
        """cos(H[:, i], H[:, j]) of the router-logit columns, (E, E), float64."""
        unit_ET = F.normalize(self.logits_TE.double().T, dim=-1)
        return (unit_ET @ unit_ET.T).cpu()

    def gates(self, keep_E: Tensor | None = None) -> Tensor:
        """(T, E) float64 gates of this layer's router (from its fp32 logits) with the experts
        outside ``keep_E`` dropped."""
        view = self.view
        bias = None if view.selection_bias is None else view.selection_bias.double()
        return dense_gates(
            self.logits_TE.double(),
            view.top_k,
            view.normalize_topk,
            bias,
            keep_E,
            view.capacity_factor,
            self.batch_tokens,
        )

    def routed_output(self, keep_E: Tensor | None = None) -> Tensor:
        """Z = Σ_e g_te E_e(x_t), (T, D) float64 (the expert outputs cast to float64), with the
        experts outside ``keep_E`` dropped (a shared expert is left out: it is the same with
        and without the drop)."""
        gates_TE = self.gates(None if keep_E is None else keep_E.to(self.logits_TE.device))
        return torch.einsum("te,etd->td", gates_TE, self.outputs_ETD.double())


def model_forward(model: nn.Module, batch: Mapping[str, Tensor]) -> None:
    """Run ``model`` on one batch of ``input_ids`` (B, S) (and ``attention_mask`` for a
    transformers model) on the model's device."""
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    if is_hf_model(model):
        mask = batch.get("attention_mask")
        model(
            input_ids=input_ids,
            attention_mask=None if mask is None else mask.to(device),
            use_cache=False,
        )
    else:
        model(input_ids)


def calibrate(model: nn.Module, batches: Iterable[Mapping[str, Tensor]]) -> list[LayerCalibration]:
    """Record every MoE layer's inputs on ``batches`` (dicts with ``input_ids`` (B, S) and,
    optionally, ``attention_mask``; masked positions are left out) and return the layers'
    :class:`LayerCalibration` in depth order. Runs in eval mode without gradients."""
    views = moe_layer_views(model)
    inputs: list[list[Tensor]] = [[] for _ in views]
    batch_tokens: list[int] = []
    mask_T: list[Tensor | None] = [None]

    def record(sink: list[Tensor], module: nn.Module, args: tuple) -> None:
        x_TD = args[0].detach().reshape(-1, args[0].shape[-1])
        if mask_T[0] is not None:
            x_TD = x_TD[mask_T[0].to(x_TD.device)]
        sink.append(x_TD.float())

    handles = [
        view.module.register_forward_pre_hook(lambda m, a, sink=sink: record(sink, m, a))
        for view, sink in zip(views, inputs, strict=True)
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                mask = batch.get("attention_mask")
                mask_T[0] = None if mask is None else mask.reshape(-1).bool()
                batch_tokens.append(
                    batch["input_ids"].numel() if mask is None else int(mask_T[0].sum())
                )
                model_forward(model, batch)
            if sum(batch_tokens) == 0:
                raise ValueError("the calibration data holds no tokens")
            return [  # built in eval mode: the routing has no jitter or logit dropout
                LayerCalibration(view, torch.cat(chunks), list(batch_tokens))
                for view, chunks in zip(views, inputs, strict=True)
            ]
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
