"""Guardrails (DESIGN.md §4): typed routing statistics in, never metric names; a missing
statistic is an error; the router gradient-norm spike trigger; slow_warmup stretches only the
warm-up of λ."""

import json
import math
import statistics

import pytest
import torch

from helpers_train import tiny_config
from moealign.alignment.guardrails import MissingStatisticError, RoutingGuardrail
from moealign.alignment.term import RoutingAlignment, RoutingPrior
from moealign.config import ConfigError, GuardrailConfig, load_config
from moealign.evaluation.routing_stats import RoutingSummary
from moealign.optim.schedules import LambdaSchedule
from moealign.training.objective import LossTerm
from moealign.training.trainer import Trainer

BALANCED = [[100, 100, 100, 100], [100, 100, 100, 100]]


def summary(counts=BALANCED, token_entropy=0.9, grad_norm=None) -> RoutingSummary:
    """A window's statistics from expert counts (L, E); usage entropy and dead experts follow
    from the counts as RoutingStats derives them."""
    counts_LE = torch.as_tensor(counts, dtype=torch.float64)
    n_layers = counts_LE.shape[0]
    return RoutingSummary(
        expert_counts=counts_LE,
        balance_loss=torch.ones(n_layers, dtype=torch.float64),
        z_loss=torch.zeros(n_layers, dtype=torch.float64),
        token_entropy=torch.full((n_layers,), token_entropy, dtype=torch.float64),
        max_vio_batch=torch.zeros(n_layers, dtype=torch.float64),
        tokens=100,
        batches=1,
        router_grad_norm=None
        if grad_norm is None
        else torch.tensor(grad_norm, dtype=torch.float64),
    )


def alignment_term(**schedule) -> RoutingAlignment:
    defaults = {"kind": "warmup", "target": 0.4, "warmup_steps": 10}
    return RoutingAlignment(RoutingPrior("uniform", 2, 4), LambdaSchedule(**defaults | schedule))


def test_patience_cooldown_and_the_reasons_from_typed_statistics():
    term = alignment_term()
    config = GuardrailConfig(policy="slow_warmup", min_usage_entropy=0.5, patience=2, cooldown=3)
    guard = RoutingGuardrail(config, n_experts=4, alignment=term)
    # Layer 1 routes 97% of its tokens to expert 0: H(usage)/log 4 = 0.121.
    sick = summary([[100, 100, 100, 100], [970, 10, 10, 10]])
    usage = -sum(p * math.log(p) for p in (0.97, 0.01, 0.01, 0.01)) / math.log(4)
    assert guard.check(1, sick) is None  # patience 2
    event = guard.check(2, sick)
    assert event["event"] == "routing_collapse" and event["policy"] == "slow_warmup"
    assert event["layers"] == {"layer1": [f"usage_entropy {usage:.3f} < 0.5"]}
    assert term.warmup_scale == 2.0 and term.weight(10) == pytest.approx(0.2)
    assert guard.check(3, sick) is None and guard.check(4, sick) is None  # cooldown
    assert guard.check(5, summary()) is None
    dead = summary([[100, 100, 100, 100], [0, 0, 0, 400]])
    assert guard.check(6, dead) is None
    assert "dead experts 0.75 > 0.5" in guard.check(7, dead)["layers"]["layer1"]
    with pytest.raises(ValueError, match="guardrails.policy='reduce_lambda'"):
        RoutingGuardrail(GuardrailConfig(policy="reduce_lambda"), 4, alignment=None)


def test_a_missing_statistic_is_an_error_never_healthy():
    guard = RoutingGuardrail(GuardrailConfig(policy="stop", grad_spike_factor=3.0), 4)
    # The spike trigger needs the router gradient norms; a summary without them (e.g. from an
    # evaluation) must not read as a healthy step.
    with pytest.raises(MissingStatisticError, match="router_grad_norm"):
        guard.check(1, summary())
    # A window without MoE layers has no routing statistic at all.
    empty = summary(torch.zeros(0, 4))
    with pytest.raises(MissingStatisticError, match="usage_entropy.*no MoE layer"):
        RoutingGuardrail(GuardrailConfig(policy="stop"), 4).check(1, empty)
    # A NaN entropy is unhealthy, not healthy.
    guard = RoutingGuardrail(GuardrailConfig(policy="stop", patience=1), 4)
    assert guard.check(1, summary(token_entropy=math.nan)) is not None
    assert guard.stop_requested


def test_gradient_norm_spike_triggers_after_the_window_fills():
    config = GuardrailConfig(
        policy="reduce_lambda", grad_spike_factor=3.0, grad_spike_window=4, patience=2, cooldown=0
    )
    term = alignment_term()
    guard = RoutingGuardrail(config, n_experts=4, alignment=term)
    for step, norm in enumerate([1.0, 2.0, 1.5, 1.0], start=1):  # the window fills
        assert guard.check(step, summary(grad_norm=[norm, 1.0])) is None
    # median 1.25: 3.7 < 3 × 1.25 is no spike; then 6.0 > 3 × median(2, 1.5, 1, 3.7) = 5.25 is
    # one, but patience is 2; 9.0 > 3 × median(1.5, 1, 3.7, 6) = 7.8 is the second in a row.
    assert guard.check(5, summary(grad_norm=[3.7, 1.0])) is None
    assert guard.check(6, summary(grad_norm=[6.0, 1.0])) is None
    event = guard.check(7, summary(grad_norm=[9.0, 1.0]))
    assert event is not None and event["event"] == "router_grad_spike"
    assert event["layers"] == {"layer0": ["router grad norm 9 > 3 × median 2.6"]}
    assert term.lambda_scale == 0.5
    # The history is part of the state (exact resume).
    restored = RoutingGuardrail(config, n_experts=4, alignment=alignment_term())
    restored.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    assert restored.grad_norm_history == [[1.0, 3.7, 6.0, 9.0], [1.0] * 4]
    assert restored.check(8, summary(grad_norm=[100.0, 1.0])) is None  # 1st of 2 (patience)
    assert restored.unhealthy_streak == 1


def test_grad_spike_factor_must_be_off_or_above_one():
    with pytest.raises(ConfigError, match="guardrails.grad_spike_factor"):
        load_config(None, ["guardrails.grad_spike_factor=0.5"])
    assert load_config(None, ["guardrails.grad_spike_factor=2"]).guardrails.grad_spike_factor == 2


def test_slow_warmup_stretches_only_the_warmup():
    # The case: warm-up to λ = 0.5 over 100 steps, anneal to 0.1 over steps 200–300.
    term = alignment_term(
        kind="warmup_anneal", target=0.5, warmup_steps=100, final=0.1, anneal_start=200,
        anneal_steps=100,
    )  # fmt: skip
    unguarded = {t: term.weight(t) for t in (0, 50, 100, 150, 250, 300, 400)}
    assert unguarded == pytest.approx({0: 0, 50: 0.25, 100: 0.5, 150: 0.5, 250: 0.3, 300: 0.1,
                                       400: 0.1})  # fmt: skip
    term.warmup_scale = 2.0  # one slow_warmup action with factor 0.5
    # Rescaling the whole schedule's time gave λ(150) = 0.375 (stretched ramp, as here) but
    # λ(300) = λ(150) = 0.5 after the anneal: 5× the unguarded 0.1.
    assert term.weight(50) == pytest.approx(0.125)
    assert term.weight(150) == pytest.approx(0.375)  # still on the stretched ramp
    assert term.weight(250) == pytest.approx(0.3)  # the anneal keeps its steps
    assert term.weight(300) == pytest.approx(0.1)
    for t in range(0, 401, 5):
        assert term.weight(t) <= unguarded.get(t, term.schedule(t)) + 1e-12
    term.warmup_scale = 4.0  # a ramp that reaches into the anneal is capped by it
    assert term.weight(250) == pytest.approx(0.3 * 250 / 400)
    assert term.weight(400) == pytest.approx(0.1)


class RouterKick(LossTerm):
    """Zero except at one step, where it pushes every router hard (a gradient spike)."""

    def __init__(self, at_step: int):
        self.at_step = at_step

    def __call__(self, batch, output, step):
        scale = 1e3 if step == self.at_step else 0.0
        return {"kick": scale * sum((r.probs**2).sum(-1).mean() for r in output.routing)}


def test_forced_router_gradient_spike_stops_training(tmp_path):
    config = tiny_config(
        tmp_path,
        "train.steps=12",
        "guardrails.policy=stop",
        "guardrails.min_usage_entropy=0.0",
        "guardrails.max_dead_fraction=1.0",
        "guardrails.grad_spike_factor=10.0",
        "guardrails.grad_spike_window=3",
        "guardrails.patience=1",
    )
    result = Trainer(config, aux_terms=[RouterKick(at_step=6)], progress=False).train()
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").open()]
    events = [r for r in records if "event" in r]
    assert [(e["step"], e["event"], e["action"]) for e in events] == [
        (7, "router_grad_spike", "stop training")
    ]
    assert result.final_eval["stopped_early_at"] == 7 == result.step
    train = {r["step"]: r for r in records if r.get("split") == "train"}
    for layer in events[0]["layers"]:
        norms = [train[s][f"routing/{layer}/router_grad_norm"] for s in (4, 5, 6, 7)]
        assert norms[-1] > 10 * statistics.median(norms[:-1])
