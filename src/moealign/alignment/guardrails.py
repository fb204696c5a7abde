"""Routing-collapse guardrails (DESIGN.md §4 "Guardrails"; the practitioners' guide, Step 7).

After each optimizer step the guardrail reads the step's per-layer routing statistics (logged
by the trainer as ``routing/layer{l}/usage_entropy``, ``.../token_entropy`` and
``.../dead_experts``), calls a layer unhealthy when

    H(usage_l)/log E < min_usage_entropy,  or  mean_t H(p_t)/log E < min_token_entropy,  or
    dead_l / E > max_dead_fraction,

and after ``patience`` unhealthy steps in a row acts by its policy on the routing-alignment
term (:class:`moealign.alignment.term.RoutingAlignment`): ``reduce_lambda`` multiplies λ by
``factor``; ``entropy_bonus`` raises the entropy-bonus weight γ by ``entropy_bonus``;
``slow_warmup`` stretches the λ warm-up by 1/``factor``; ``stop`` ends training; ``off`` only
reports. Every trigger returns an event record for ``metrics.jsonl``.
"""

from __future__ import annotations

import re
from typing import Any

from moealign.alignment.term import RoutingAlignment
from moealign.config import GuardrailConfig

_LAYER_KEY = re.compile(r"^routing/layer(\d+)/(usage_entropy|token_entropy|dead_experts)$")


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

    def unhealthy_layers(self, metrics: dict[str, float]) -> dict[int, list[str]]:
        """Layer → the reasons it is unhealthy, from one step's metrics."""
        values: dict[int, dict[str, float]] = {}
        for key, value in metrics.items():
            match = _LAYER_KEY.match(key)
            if match:
                values.setdefault(int(match[1]), {})[match[2]] = value
        cfg = self.config
        reasons: dict[int, list[str]] = {}
        for layer, stats in sorted(values.items()):
            found = []
            for name, floor in (
                ("usage_entropy", cfg.min_usage_entropy),
                ("token_entropy", cfg.min_token_entropy),
            ):
                if stats.get(name, 1.0) < floor:
                    found.append(f"{name} {stats[name]:.3f} < {floor}")
            dead_fraction = stats.get("dead_experts", 0.0) / self.n_experts
            if dead_fraction > cfg.max_dead_fraction:
                found.append(f"dead experts {dead_fraction:.2f} > {cfg.max_dead_fraction}")
            if found:
                reasons[layer] = found
        return reasons

    def check(self, step: int, metrics: dict[str, float]) -> dict[str, Any] | None:
        """Inspect one step; return an event record when the guardrail triggers."""
        unhealthy = self.unhealthy_layers(metrics)
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
        return {
            "step": step,
            "event": "routing_collapse",
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
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.unhealthy_streak = int(state["unhealthy_streak"])
        self.last_action_step = state["last_action_step"]
        self.stop_requested = bool(state["stop_requested"])
