"""Routing manifold alignment during training (DESIGN.md §4; the practitioners' guide, Step 2).

L_total = L_lm + α L_bal + β L_z + λ(t) · L_align, with
L_align = mean_τ Σ_l KL(p_l(·|τ) ‖ q_l) (:func:`moealign.alignment.loss.routing_alignment_loss`)
and a fixed prior q_l per MoE layer:

* ``uniform``: q_l = 1/E;
* ``marginal``: an exponential moving average of the all-task routing distribution
  q_l ← d·q_l + (1 − d)·mean_t p_l(·|x_t) over the task tokens of each global training batch
  (once per optimizer step, pooling every micro-batch of every data-parallel rank: the sums and
  the token count are all-reduced, so every rank holds the same prior at any world size or
  accumulation), held without gradient (aligns every task to the shared routing); saved in
  checkpoints;
* ``file``: an (L, E) tensor read from a safetensors file (key ``prior``).

Task ids travel with the batch (``batch["task_ids"]``), never through the model.

With several ranks the loss's p_l(·|τ) stays per micro-batch, like the balance loss (DESIGN.md
§4: the "batch" is the micro-batch), so data parallelism and gradient accumulation give the
same gradient as one process accumulating the same micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from moealign.alignment.loss import routing_alignment_loss
from moealign.config import AlignmentConfig
from moealign.evaluation import diagnostics
from moealign.optim.schedules import LambdaSchedule

PRIOR_KINDS = ("uniform", "marginal", "file")


class RoutingPrior:
    """The prior q (L, E) of the alignment loss; see the module docstring for the kinds."""

    def __init__(
        self,
        kind: str,
        n_layers: int,
        n_experts: int,
        *,
        decay: float = 0.99,
        path: str | Path | None = None,
    ):
        if kind not in PRIOR_KINDS:
            raise ValueError(
                f"alignment.prior={kind!r} is not accepted; choose one of {PRIOR_KINDS}"
            )
        if not 0.0 <= decay < 1.0:
            raise ValueError(
                f"alignment.prior_decay={decay!r} is not accepted; expected 0 <= d < 1"
            )
        self.kind, self.decay = kind, decay
        self.value_LE = torch.full((n_layers, n_experts), 1.0 / n_experts, dtype=torch.float64)
        self._pending_sums: Tensor | None = None  # (L·E + 1,): Σ probs over task tokens, count
        if kind == "file":
            self.value_LE = self._read(path, n_layers, n_experts)

    @staticmethod
    def _read(path: str | Path | None, n_layers: int, n_experts: int) -> Tensor:
        if path is None or not Path(path).is_file():
            raise ValueError(
                f"alignment.prior_path={str(path)!r} is not accepted; expected an existing "
                "safetensors file holding a tensor 'prior' of shape (n_moe_layers, n_experts)"
            )
        tensors = load_file(str(path))
        prior = tensors.get("prior")
        if prior is None or tuple(prior.shape) != (n_layers, n_experts):
            shape = None if prior is None else tuple(prior.shape)
            raise ValueError(
                f"alignment.prior_path={str(path)!r}: tensor 'prior' has shape {shape}; "
                f"expected ({n_layers}, {n_experts})"
            )
        prior = prior.double()
        sums = prior.sum(-1)
        if (prior <= 0).any() or not torch.allclose(sums, torch.ones_like(sums), atol=1e-5):
            raise ValueError(
                f"alignment.prior_path={str(path)!r}: every row must be a distribution with "
                "positive entries summing to 1"
            )
        return prior

    def value(self, device: torch.device | str) -> Tensor:
        return self.value_LE.to(device=device, dtype=torch.float32)

    @torch.no_grad()
    def accumulate(self, probs_per_layer: Sequence[Tensor], task_ids_T: Tensor) -> None:
        """Marginal prior only: add one micro-batch's Σ_t p_l(·|x_t) over task tokens and their
        number to the sums that :meth:`step` turns into the EMA update."""
        if self.kind != "marginal":
            return
        labelled = task_ids_T.reshape(-1).to(probs_per_layer[0].device) >= 0
        sums_LE = torch.stack([p[labelled].double().sum(0) for p in probs_per_layer])
        sums = torch.cat([sums_LE.flatten(), labelled.sum().double().reshape(1)])
        self._pending_sums = sums if self._pending_sums is None else self._pending_sums + sums

    @torch.no_grad()
    def step(self, reduce_sum: Callable[[Tensor], Tensor] | None = None) -> None:
        """q_l ← d·q_l + (1 − d)·(Σ p_l / #task tokens) over what was accumulated since the last
        step (no change without task tokens). ``reduce_sum`` sums a tensor over data-parallel
        ranks in place; every rank must call it (a collective), with or without sums."""
        if self.kind != "marginal":
            return
        sums = self._pending_sums
        if sums is None:
            sums = torch.zeros(self.value_LE.numel() + 1, dtype=torch.float64)
        if reduce_sum is not None:
            sums = reduce_sum(sums)
        self._pending_sums = None
        sums = sums.cpu()
        if sums[-1] > 0:
            batch_LE = (sums[:-1] / sums[-1]).view_as(self.value_LE)
            self.value_LE = self.decay * self.value_LE + (1.0 - self.decay) * batch_LE

    def discard(self) -> None:
        """Drop what was accumulated since the last :meth:`step` (a skipped optimizer step)."""
        self._pending_sums = None

    def update(self, probs_per_layer: Sequence[Tensor], task_ids_T: Tensor) -> None:
        """One process, one batch: :meth:`accumulate` then :meth:`step`."""
        self.accumulate(probs_per_layer, task_ids_T)
        self.step()

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value_LE.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["kind"] != self.kind:
            raise ValueError(f"checkpoint prior kind {state['kind']!r} != configured {self.kind!r}")
        self.value_LE = torch.as_tensor(state["value"], dtype=torch.float64).clone()


class RoutingAlignment:
    """The objective's term λ(t) · L_align (plus an optional entropy bonus, §4 guardrails); a
    :class:`moealign.training.objective.LossTerm`.

    ``term(batch, model_output, step)`` returns ``{"align_loss": λ(t)·L_align − γ·H}`` where
    H is the mean normalised per-token router entropy and γ = ``entropy_bonus`` (0 unless a
    guardrail raised it). :meth:`metrics` holds, for the last call, λ, the unweighted KL and γ
    (the per-task routing entropies H(p_l(·|τ))/log E of every run are routing statistics).
    ``lambda_scale`` and ``warmup_scale`` are the guardrail's handles (reduce λ, slow warm-up).
    """

    def __init__(self, prior: RoutingPrior, schedule: LambdaSchedule):
        self.prior = prior
        self.schedule = schedule
        self.lambda_scale = 1.0
        self.warmup_scale = 1.0
        self.entropy_bonus = 0.0
        self._metrics: dict[str, float] = {}

    def weight(self, step: float) -> float:
        """λ(t) after the guardrails' adjustments (DESIGN.md §4). A warm-up schedule is
        λ(t) = w(t) · a(t), with the warm-up factor w(t) = min(1, t / N_warm) and
        a(t) = λ(max(t, N_warm)) the plateau and anneal; slowing the warm-up by
        s = ``warmup_scale`` ≥ 1 stretches only the factor:

            λ_g(t) = lambda_scale · min(1, t / (s · N_warm)) · λ(max(t, N_warm))

        so λ_g never exceeds the unguarded λ(t) and the anneal keeps its steps (s = 1 gives λ;
        schedules without a warm-up ignore s).
        """
        schedule = self.schedule
        warm = schedule.kind in ("warmup", "warmup_anneal") and schedule.warmup_steps > 0
        if not warm:
            return self.lambda_scale * schedule(step)
        factor = min(1.0, step / (self.warmup_scale * schedule.warmup_steps))
        return self.lambda_scale * factor * schedule(max(step, schedule.warmup_steps))

    def __call__(self, batch: Mapping[str, Tensor], output, step: int) -> dict[str, Tensor]:
        probs = [info.probs for info in output.routing]
        if not probs:
            raise ValueError("routing alignment needs a model with MoE layers (model.ffn='moe')")
        task_ids_T = batch["task_ids"].reshape(-1)
        prior_LE = self.prior.value(probs[0].device)
        align = routing_alignment_loss(probs, task_ids_T, prior_LE)
        lam = self.weight(step)
        loss = lam * align
        if self.entropy_bonus > 0:
            entropy = torch.stack([diagnostics.token_entropy(p) for p in probs]).mean().float()
            loss = loss - self.entropy_bonus * entropy
        self.prior.accumulate(probs, task_ids_T)
        self._metrics = {
            "lambda": lam,
            "align_kl": float(align.detach()),
            "align_entropy_bonus": self.entropy_bonus,
        }
        return {"align_loss": loss}

    def end_step(self, reduce_sum: Callable[[Tensor], Tensor], applied: bool) -> None:
        """After the optimizer step: the marginal prior's EMA update over the global batch
        (``reduce_sum`` sums over data-parallel ranks; see :meth:`RoutingPrior.step`); a step
        that was not applied (non-finite, skipped) leaves the prior unchanged."""
        if applied:
            self.prior.step(reduce_sum)
        else:
            self.prior.discard()

    def metrics(self) -> dict[str, float]:
        return dict(self._metrics)

    def state_dict(self) -> dict[str, Any]:
        return {
            "prior": self.prior.state_dict(),
            "lambda_scale": self.lambda_scale,
            "warmup_scale": self.warmup_scale,
            "entropy_bonus": self.entropy_bonus,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.prior.load_state_dict(state["prior"])
        self.lambda_scale = float(state["lambda_scale"])
        self.warmup_scale = float(state["warmup_scale"])
        self.entropy_bonus = float(state["entropy_bonus"])


def build_alignment(
    config: AlignmentConfig, n_layers: int, n_experts: int
) -> RoutingAlignment | None:
    """The alignment aux term of a run config (None when ``schedule = "none"``)."""
    if config.schedule == "none":
        return None
    prior = RoutingPrior(
        config.prior,
        n_layers,
        n_experts,
        decay=config.prior_decay,
        path=config.prior_path or None,
    )
    schedule = LambdaSchedule(
        kind=config.schedule,
        target=config.lambda_target,
        warmup_steps=config.warmup_steps,
        final=config.lambda_final,
        anneal_start=config.anneal_start,
        anneal_steps=config.anneal_steps,
    )
    return RoutingAlignment(prior, schedule)
