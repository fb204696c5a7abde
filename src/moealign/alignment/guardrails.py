"""Routing guardrails (DESIGN.md §4 "Guardrails"; the practitioners' guide, Step 7).

After each optimizer step the guardrail reads the step's typed routing statistics
(:class:`~moealign.evaluation.routing_stats.RoutingSummary`, never metric names) and calls a
layer l unhealthy when

    usage_entropy_l < min_usage_entropy,  or  token_entropy_l < min_token_entropy,  or
    dead_experts_l / E > max_dead_fraction,  or (with grad_spike_factor > 0)
    router_grad_norm_l > grad_spike_factor · median of its last grad_spike_window norms

(entropies normalised by log E; the spike test starts once the window is full). A statistic it
needs but the summary lacks raises :class:`MissingStatisticError`: absence is never health.
After ``patience`` unhealthy steps in a row it acts by its policy on the routing-alignment term
(:class:`moealign.alignment.term.RoutingAlignment`): ``reduce_lambda`` multiplies λ by
``factor``; ``entropy_bonus`` raises the entropy-bonus weight γ by ``entropy_bonus``;
``slow_warmup`` stretches the λ warm-up by 1/``factor`` (only the warm-up:
:meth:`RoutingAlignment.weight`); ``stop`` ends training; ``off`` only reports. Then it waits
``cooldown`` steps. Every trigger returns an event record for ``metrics.jsonl``.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from moealign.alignment.term import RoutingAlignment
from moealign.config import GuardrailConfig
from moealign.evaluation.routing_stats import MissingStatisticError, RoutingSummary

__all__ = ["MissingStatisticError", "RoutingGuardrail"]


class RoutingGuardrail:
    """Watches per-layer routing health and applies ``config.policy`` (module docstring)."""

    def __init__(
        self, config: GuardrailConfig, n_experts: int, alignment: RoutingAlignment | None = None
    ):
        needs_alignment = ("reduce_lambda", "entropy_bonus", "slow_warmup")
        if config.policy in needs_alignment and alignment is None:
            raise ValueError(
                f"guardrails.policy={config.policy!r} acts on the routing alignment term; "
                "set alignment.schedule (not 'none') or choose policy 'off' or 'stop'"
            )
        self.config, self.n_experts, self.alignment = config, n_experts, alignment
        self.unhealthy_streak = 0
        self.last_action_step: int | None = None
        self.stop_requested = False
        self.grad_norm_history: list[list[float]] = []  # per layer, the last window's norms

    def unhealthy_layers(self, routing: RoutingSummary) -> dict[int, list[str]]:
        """Layer → the reasons it is unhealthy, from one step's routing statistics."""
        cfg = self.config
        found: dict[int, list[str]] = {}
        for name, floor in (
            ("usage_entropy", cfg.min_usage_entropy),
            ("token_entropy", cfg.min_token_entropy),
        ):
            for layer, value in enumerate(routing.require(name).tolist()):
                if not value >= floor:  # NaN is unhealthy too
                    found.setdefault(layer, []).append(f"{name} {value:.3f} < {floor}")
        dead_L = routing.require("dead_experts") / self.n_experts
        for layer, fraction in enumerate(dead_L.tolist()):
            if fraction > cfg.max_dead_fraction:
                found.setdefault(layer, []).append(
                    f"dead experts {fraction:.2f} > {cfg.max_dead_fraction}"
                )
        if cfg.grad_spike_factor > 0:
            for layer, why in self._grad_spikes(routing.require("router_grad_norm").tolist()):
                found.setdefault(layer, []).append(why)
        return dict(sorted(found.items()))

    def _grad_spikes(self, norms: list[float]) -> list[tuple[int, str]]:
        """Layers whose router gradient norm exceeds factor × the running median of the last
        ``grad_spike_window`` steps; then each finite norm joins its layer's window."""
        cfg = self.config
        if not self.grad_norm_history:
            self.grad_norm_history = [[] for _ in norms]
        spikes = []
        for layer, (norm, window) in enumerate(zip(norms, self.grad_norm_history, strict=True)):
            if len(window) == cfg.grad_spike_window:
                median = statistics.median(window)
                if not norm <= cfg.grad_spike_factor * median:  # NaN is a spike too
                    why = f"router grad norm {norm:.3g} > {cfg.grad_spike_factor:g} × median"
                    spikes.append((layer, f"{why} {median:.3g}"))
            if math.isfinite(norm):
                window.append(norm)
                del window[: -cfg.grad_spike_window]
        return spikes

    def check(self, step: int, routing: RoutingSummary) -> dict[str, Any] | None:
        """Inspect one step; return an event record when the guardrail triggers."""
        unhealthy = self.unhealthy_layers(routing)
        self.unhealthy_streak = self.unhealthy_streak + 1 if unhealthy else 0
        cooling = (
            self.last_action_step is not None
            and step - self.last_action_step < self.config.cooldown
        )
        if self.unhealthy_streak < self.config.patience or cooling:
            return None
        self.last_action_step = step
        self.unhealthy_streak = 0
        action = self._act()
        reasons = [why for layer in unhealthy.values() for why in layer]
        spikes_only = all(why.startswith("router grad norm") for why in reasons)
        return {
            "step": step,
            "event": "router_grad_spike" if spikes_only else "routing_collapse",
            "policy": self.config.policy,
            "action": action,
            "layers": {f"layer{layer}": why for layer, why in unhealthy.items()},
        }

    def _act(self) -> str:
        cfg, term = self.config, self.alignment
        if cfg.policy == "reduce_lambda":
            term.lambda_scale *= cfg.factor
            return f"lambda scale -> {term.lambda_scale:g}"
        if cfg.policy == "entropy_bonus":
            term.entropy_bonus += cfg.entropy_bonus
            return f"entropy bonus -> {term.entropy_bonus:g}"
        if cfg.policy == "slow_warmup":
            term.warmup_scale /= cfg.factor
            return f"warm-up stretched x{term.warmup_scale:g}"
        if cfg.policy == "stop":
            self.stop_requested = True
            return "stop training"
        return "none (policy off)"

    def state_dict(self) -> dict[str, Any]:
        return {
            "unhealthy_streak": self.unhealthy_streak,
            "last_action_step": self.last_action_step,
            "stop_requested": self.stop_requested,
            "grad_norm_history": [list(window) for window in self.grad_norm_history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.unhealthy_streak = int(state["unhealthy_streak"])
        self.last_action_step = state["last_action_step"]
        self.stop_requested = bool(state["stop_requested"])
        self.grad_norm_history = [list(map(float, w)) for w in state.get("grad_norm_history", [])]
