"""Routing alignment in training (DESIGN.md §4): λ schedules, priors, the aux term, guardrails."""

import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from helpers_saturated import saturated_logits
from helpers_train import tiny_config
from moealign.alignment.loss import routing_alignment_loss
from moealign.alignment.term import RoutingPrior, build_alignment
from moealign.config import AlignmentConfig, ConfigError, load_config
from moealign.io import read_jsonl
from moealign.nn.transformer import ModelConfig, MoETransformer
from moealign.optim.schedules import LambdaSchedule
from moealign.training.trainer import Trainer


@pytest.mark.parametrize(
    "schedule,values",
    [
        (LambdaSchedule("none", 0.3), {0: 0.0, 50: 0.0}),
        (LambdaSchedule("fixed", 0.3, warmup_steps=10), {0: 0.3, 5: 0.3, 100: 0.3}),
        (LambdaSchedule("warmup", 0.3, warmup_steps=10), {0: 0.0, 5: 0.15, 10: 0.3, 99: 0.3}),
        (
            LambdaSchedule("warmup_anneal", 0.4, 10, final=0.1, anneal_start=20, anneal_steps=10),
            {5: 0.2, 10: 0.4, 20: 0.4, 25: 0.25, 30: 0.1, 90: 0.1},
        ),
    ],
)
def test_lambda_schedule_values(schedule, values):
    for step, expected in values.items():
        assert schedule(step) == pytest.approx(expected), step


def test_lambda_schedule_rejects_bad_values():
    with pytest.raises(ValueError, match="alignment.schedule='cosine'"):
        LambdaSchedule("cosine")
    with pytest.raises(ValueError, match="anneal_start=5"):
        LambdaSchedule("warmup_anneal", 0.1, warmup_steps=10, anneal_start=5)


def test_marginal_prior_is_an_ema_of_task_token_routing():
    prior = RoutingPrior("marginal", 1, 2, decay=0.75)
    probs = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.1, 0.9]])
    prior.update([probs], torch.tensor([3, 7, -1]))  # the untagged token is ignored
    expected = 0.75 * torch.tensor([0.5, 0.5]) + 0.25 * torch.tensor([0.7, 0.3])
    torch.testing.assert_close(prior.value_LE[0], expected.double())
    state = prior.state_dict()
    restored = RoutingPrior("marginal", 1, 2)
    restored.load_state_dict(state)
    assert torch.equal(restored.value_LE, prior.value_LE)
    uniform = RoutingPrior("uniform", 1, 2)
    uniform.update([probs], torch.tensor([0, 0, 0]))
    torch.testing.assert_close(uniform.value_LE, torch.full((1, 2), 0.5, dtype=torch.float64))


def test_file_prior_loads_and_validates(tmp_path):
    good = tmp_path / "prior.safetensors"
    save_file({"prior": torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]])}, str(good))
    prior = RoutingPrior("file", 2, 4, path=good)
    assert prior.value_LE[0, 0].item() == pytest.approx(0.7)
    with pytest.raises(ValueError, match=r"shape \(2, 4\); expected \(3, 4\)"):
        RoutingPrior("file", 3, 4, path=good)
    bad = tmp_path / "bad.safetensors"
    save_file({"prior": torch.tensor([[0.5, 0.6]])}, str(bad))
    with pytest.raises(ValueError, match="distribution"):
        RoutingPrior("file", 1, 2, path=bad)
    with pytest.raises(ValueError, match="prior_path='missing'"):
        RoutingPrior("file", 1, 2, path="missing")


def _model_and_batch():
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=32,
        d_model=16,
        n_layers=2,
        n_heads=2,
        max_seq_len=8,
        n_experts=4,
        top_k=2,
        expert_d_ff=16,
    )
    model = MoETransformer(config)
    batch = {
        "input_ids": torch.randint(0, 32, (3, 8)),
        "task_ids": torch.tensor([[0] * 8, [1] * 8, [-1] * 8]),
    }
    return model, batch


def test_term_is_lambda_times_the_kl_and_reaches_routers_only_through_probs():
    model, batch = _model_and_batch()
    term = build_alignment(AlignmentConfig(schedule="fixed", lambda_target=0.5), 2, 4)
    output = model(batch["input_ids"])
    loss = term(batch, output, step=0)["align_loss"]
    expected = routing_alignment_loss(
        [r.probs for r in output.routing], batch["task_ids"].reshape(-1), torch.full((2, 4), 0.25)
    )
    assert loss.item() == pytest.approx(0.5 * expected.item(), rel=1e-6)
    assert term.metrics()["lambda"] == 0.5 and term.metrics()["align_kl"] == pytest.approx(
        expected.item()
    )
    loss.backward()
    for layer in model.moe_layers:
        assert layer.router.weight.grad.abs().sum() > 0
    # The loss reads routing probabilities only: nothing after the last router gets a gradient
    # (the last layer's experts, the final norm); earlier experts do, through later routers.
    last = model.moe_layers[-1].experts
    assert last.w_down.grad is None and last.w_up.grad is None and last.w_gate.grad is None
    assert model.norm.weight.grad is None


def test_entropy_bonus_subtracts_the_mean_normalised_token_entropy():
    model, batch = _model_and_batch()
    term = build_alignment(AlignmentConfig(schedule="fixed", lambda_target=0.0), 2, 4)
    term.entropy_bonus = 0.2
    output = model(batch["input_ids"])
    loss = term(batch, output, step=0)["align_loss"]
    entropies = [-(r.probs * r.probs.log()).sum(-1).mean() / math.log(4) for r in output.routing]
    assert loss.item() == pytest.approx(-0.2 * torch.stack(entropies).mean().item(), rel=1e-5)


def _collapse_prior(tmp_path):
    path = tmp_path / "collapse.safetensors"
    prior = torch.tensor([[0.97, 0.01, 0.01, 0.01]] * 2)
    save_file({"prior": prior}, str(path))
    return path


@pytest.mark.parametrize("policy", ["reduce_lambda", "stop"])
def test_forced_collapse_triggers_the_configured_guardrail(tmp_path, policy):
    # A prior concentrated on expert 0 with a huge λ drives every task's routing onto it. Top-1
    # routing, so that the collapse shows in the usage entropy: with top-2 of 4 experts it
    # cannot fall below 0.5 (expert 0 plus one other per token), too close to the 0.6 threshold.
    config = tiny_config(
        tmp_path,
        f"name={policy}",
        "model.top_k=1",
        "train.steps=30",
        "optim.lr=1e-2",
        "loss.balance_coef=0.0",
        "alignment.schedule=fixed",
        "alignment.lambda_target=50.0",
        "alignment.prior=file",
        f"alignment.prior_path={_collapse_prior(tmp_path)}",
        f"guardrails.policy={policy}",
        "guardrails.min_usage_entropy=0.6",
        "guardrails.patience=2",
        "guardrails.cooldown=5",
    )
    trainer = Trainer(config, progress=False)
    result = trainer.train()
    records = read_jsonl(result.run_dir / "metrics.jsonl")
    events = [r for r in records if "event" in r]
    assert events, "the collapse was not detected"
    assert events[0]["policy"] == policy
    if policy == "reduce_lambda":
        assert trainer.alignment.lambda_scale == pytest.approx(0.5 ** len(events))
        assert result.step == 30
    else:
        assert result.final_eval["stopped_early_at"] == events[0]["step"] == result.step < 30


def test_alignment_config_errors():
    with pytest.raises(ConfigError, match="alignment.schedule"):
        load_config(None, ["alignment.schedule=warmup", "model.ffn=dense"])
    with pytest.raises(ConfigError, match="alignment.prior"):
        load_config(None, ["alignment.prior=gaussian"])
    with pytest.raises(ConfigError, match="guardrails.factor"):
        load_config(None, ["guardrails.factor=1.5"])


def test_entropy_bonus_is_finite_when_routing_has_collapsed_to_exact_zeros():
    """The bonus switches on when routing collapses, i.e. when fp32 probabilities reach 0."""
    term = build_alignment(AlignmentConfig(schedule="fixed", lambda_target=0.5), 1, 4)
    term.entropy_bonus = 0.2
    logits = saturated_logits().requires_grad_(True)
    logits64 = logits.detach().double().requires_grad_(True)
    output = SimpleNamespace(routing=[SimpleNamespace(probs=torch.softmax(logits, -1))])
    batch = {"task_ids": torch.tensor([0, 1] * 6)}
    loss = term(batch, output, step=0)["align_loss"]
    probs64 = torch.softmax(logits64, -1)
    kl64 = (
        sum((p * (p * 4).log()).sum() for p in (probs64[0::2].mean(0), probs64[1::2].mean(0))) / 2
    )
    entropy64 = -(probs64 * probs64.log()).sum(-1).mean() / math.log(4)
    loss64 = 0.5 * kl64 - 0.2 * entropy64
    loss.backward()
    loss64.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits.grad.double(), logits64.grad, rtol=1e-5, atol=1e-6)
