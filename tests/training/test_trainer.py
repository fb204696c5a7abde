"""The Trainer: learning, the loss bookkeeping, exact resume, signals, aux-term hook."""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers_cli import CONFIGS, cli_env
from helpers_train import tiny_config
from moealign.evaluation.diagnostics import routing_projection_alignment
from moealign.io import read_jsonl
from moealign.training.checkpoint import load_latest
from moealign.training.objective import LossTerm
from moealign.training.trainer import Trainer


def read_records(run_dir, split="train"):
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("split") == split]


def test_loss_goes_down_and_run_directory_is_complete(tmp_path):
    config = tiny_config(tmp_path, "train.steps=40", "optim.lr=1e-2", "train.checkpoint_every=20")
    trainer = Trainer(config, progress=False)
    before = trainer.evaluate()["val_loss"]
    result = trainer.train()
    after = result.final_eval["val_loss"]
    assert not result.interrupted and result.step == 40
    assert after < before - 1.0, (before, after)
    run = result.run_dir
    assert {p.name for p in run.iterdir()} == {
        ".lock",
        ".moealign.json",
        "config.json",
        "meta.json",
        "metrics.jsonl",
        "checkpoints",
        "tokenizer",
        "final_eval.json",
    }
    assert {p.name for p in (run / "tokenizer").iterdir()} == {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    assert json.loads((run / "config.json").read_text()) == config.to_dict()
    records = read_records(run)
    assert [r["step"] for r in records] == list(range(1, 41))
    first = records[0]
    for key in ("loss", "lm_loss", "balance_loss", "z_loss", "lr", "grad_norm", "tokens_per_s"):
        assert key in first
    for key in ("max_vio", "dead_experts", "usage_entropy", "token_entropy", "balance_loss"):
        assert f"routing/layer1/{key}" in first and f"routing/{key}" in first
    expected = first["lm_loss"] + 1e-2 * first["balance_loss"] + 1e-3 * first["z_loss"]
    assert first["loss"] == pytest.approx(expected, rel=1e-6)
    final = json.loads((run / "final_eval.json").read_text())
    assert final["val_loss"] == after and final["params_active"] < final["params_total"]
    # the end-of-run task evaluation: 2 examples per task of the seen-task test split
    tasks = final["tasks"]["sets"]["test"]["tasks"]
    assert sorted(tasks) == ["addition", "copy", "reverse", "sort"]
    assert all(len(result["correct"]) == 2 for result in tasks.values())
    assert 0.0 <= final["task_accuracy_seen"] <= 1.0
    assert final["task_accuracy_seen"] == pytest.approx(
        sum(r["accuracy"] for r in tasks.values()) / 4
    )
    assert final["task_accuracy"]["seen"] == {t: r["accuracy"] for t, r in tasks.items()}
    assert final["task_accuracy"]["heldout"] == {}
    # λ per layer is part of every evaluation record (here the final one: eval_every=0)
    alignment = [final[f"val_routing/layer{layer}/projection_alignment"] for layer in (0, 1)]
    assert all(0.0 <= value <= 1.0 for value in alignment)
    assert alignment == routing_projection_alignment(trainer.model)
    assert final["val_routing/projection_alignment"] == pytest.approx(sum(alignment) / 2)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_000020",
        "step_000040",
    ]


def test_step_losses_match_an_independent_float64_computation(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "train.grad_accum=2"), progress=False)
    reference = copy.deepcopy(trainer.model).double()
    batch = next(trainer.data.train)
    with torch.no_grad():
        output = reference(batch["input_ids"])
        lm = F.cross_entropy(
            output.logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100
        )
        halves = [reference(batch["input_ids"][r]).routing for r in (slice(0, 4), slice(4, 8))]
        balance = sum(torch.stack([r.load_balance_loss for r in h]).mean() for h in halves) / 2
        z = sum(torch.stack([r.z_loss for r in h]).mean() for h in halves) / 2
    metrics = trainer.train_step(batch)
    # LM loss: token mean over the whole global batch; router terms: mean over micro-batches
    assert metrics["lm_loss"] == pytest.approx(lm.item(), rel=1e-5)
    assert metrics["balance_loss"] == pytest.approx(balance.item(), rel=1e-5)
    assert metrics["z_loss"] == pytest.approx(z.item(), rel=1e-5)
    # MaxVio (max − mean)/mean of the expert loads, by hand with numpy, per layer:
    # max_vio from the step's pooled loads, max_vio_batch the mean over the two micro-batches.
    loads = [[np.bincount(r.topk_idx.flatten().numpy(), minlength=4) for r in h] for h in halves]

    def max_vio(load):
        return (load.max() - load.mean()) / load.mean()

    for layer in range(2):
        pooled = max_vio(loads[0][layer] + loads[1][layer])
        per_batch = (max_vio(loads[0][layer]) + max_vio(loads[1][layer])) / 2
        assert metrics[f"routing/layer{layer}/max_vio"] == pytest.approx(pooled)
        assert metrics[f"routing/layer{layer}/max_vio_batch"] == pytest.approx(per_batch)


def test_accumulated_micro_batches_give_the_whole_batch_gradient(tmp_path):
    # Without the per-micro-batch router terms, 2 accumulated micro-batches = 1 whole batch.
    common = ("loss.balance_coef=0", "loss.z_coef=0", "optim.grad_clip=0")
    accumulated = Trainer(
        tiny_config(tmp_path, "name=a", "train.grad_accum=2", *common), progress=False
    )
    whole = Trainer(tiny_config(tmp_path, "name=b", *common), progress=False)
    for a, b in zip(accumulated.model.parameters(), whole.model.parameters(), strict=True):
        assert torch.equal(a, b)
    batch = next(accumulated.data.train)
    accumulated.train_step(batch)
    whole.train_step(batch)
    for a, b in zip(accumulated.model.parameters(), whole.model.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)


class RoutingMeanPenalty(LossTerm):
    """A stateful aux term: coef · ‖mean routing probs − EMA‖², the EMA kept as state."""

    def __init__(self, coef: float) -> None:
        self.coef, self.ema = coef, None

    def __call__(self, batch, output, step):
        probs = torch.stack([r.probs.mean(0) for r in output.routing])
        target = probs.detach() if self.ema is None else self.ema
        self.ema = 0.9 * target + 0.1 * probs.detach()
        assert batch["task_ids"].shape == batch["input_ids"].shape
        return {"routing_penalty": self.coef * (step + 1) * ((probs - target) ** 2).sum()}

    def state_dict(self):
        return {"ema": self.ema}

    def load_state_dict(self, state):
        self.ema = state["ema"]


def _run(tmp_path, name, stop_at=None, resume=False):
    config = tiny_config(
        tmp_path,
        f"name={name}",
        "train.steps=6",
        "train.grad_accum=2",
        "train.checkpoint_every=2",
        "train.eval_every=2",
        "model.router_options={expert_bias = true, jitter = 0.1}",
        # the routing alignment with its EMA prior and a guardrail that fires and acts
        "alignment.schedule=warmup",
        "alignment.prior=marginal",
        "alignment.prior_decay=0.5",
        "alignment.warmup_steps=4",
        "guardrails.policy=reduce_lambda",
        "guardrails.min_usage_entropy=0.999",
        "guardrails.patience=1",
        "guardrails.cooldown=2",
    )
    term = RoutingMeanPenalty(coef=5.0)
    trainer = Trainer(config, aux_terms=[term], resume=resume, progress=False)
    return trainer, term, trainer.train(stop_at=stop_at)


def test_interrupted_and_resumed_run_ends_bit_for_bit_equal(tmp_path):
    straight, straight_term, result = _run(tmp_path, "straight")
    assert result.step == 6 and not result.interrupted
    first, _, partial = _run(tmp_path, "split", stop_at=3)
    assert partial.interrupted and partial.step == 3 and partial.final_eval == {}
    assert load_latest(tmp_path / "split" / "checkpoints").step == 3
    resumed, resumed_term, final = _run(tmp_path, "split", resume=True)
    assert resumed.step == 6 and not final.interrupted
    for (name, a), b in zip(
        straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    biases = [k for k in straight.model.state_dict() if k.endswith("expert_bias")]
    assert biases and any(straight.model.state_dict()[k].abs().sum() > 0 for k in biases)
    assert torch.equal(straight_term.ema, resumed_term.ema)
    assert torch.equal(straight.alignment.prior.value_LE, resumed.alignment.prior.value_LE)
    assert straight.alignment.lambda_scale == resumed.alignment.lambda_scale < 1.0
    assert straight.guardrail.state_dict() == resumed.guardrail.state_dict()
    assert final.final_eval["val_loss"] == result.final_eval["val_loss"]

    def comparable(run):
        return [
            {k: v for k, v in r.items() if k != "tokens_per_s"}
            for r in read_records(tmp_path / run) + read_records(tmp_path / run, "val")
        ]

    assert comparable("split") == comparable("straight")
    events = read_jsonl(tmp_path / "split" / "metrics.jsonl")
    events = [r for r in events if "event" in r]
    assert [e["step"] for e in events] == [1, 3, 5]  # patience 1, cooldown 2
    assert "routing_penalty" in read_records(tmp_path / "split")[0]


@pytest.mark.parametrize("optimizer", ["adamw", "muon", "adamh", "muonh"])
def test_every_optimizer_resumes_bit_for_bit_through_the_checkpoint(tmp_path, optimizer):
    # The optimizer state (moments, momentum buffers, steps) travels through the trainer's
    # safetensors checkpoint; a run stopped at step 2 and resumed equals a straight run.
    def run(name, **kwargs):
        overrides = (f"name={name}", "train.steps=4", "train.checkpoint_every=2")
        config = tiny_config(tmp_path, f"optim.name={optimizer}", *overrides)
        trainer = Trainer(config, resume=kwargs.pop("resume", False), progress=False)
        return trainer, trainer.train(**kwargs)

    straight, _ = run("straight")
    assert run("split", stop_at=2)[1].interrupted
    resumed, result = run("split", resume=True)
    assert result.step == 4 and not result.interrupted
    for (name, a), b in zip(
        straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    straight_state = straight.optimizer.state_dict()["state"]
    resumed_state = resumed.optimizer.state_dict()["state"]
    assert straight_state.keys() == resumed_state.keys() and straight_state
    for index, state in straight_state.items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(resumed_state[index][key]))


def test_resume_needs_the_same_config_and_refuses_overwrite(tmp_path):
    Trainer(tiny_config(tmp_path, "train.steps=2"), progress=False).train()
    with pytest.raises(ValueError, match="--resume"):
        Trainer(tiny_config(tmp_path, "train.steps=2"), progress=False)
    with pytest.raises(ValueError, match=r"optim\.lr"):
        Trainer(tiny_config(tmp_path, "optim.lr=0.5"), resume=True, progress=False)


def test_bf16_autocast_step_runs_on_cpu(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "train.precision=bf16"), progress=False)
    assert trainer.autocast_dtype is torch.bfloat16
    metrics = trainer.train_step(next(trainer.data.train))
    assert torch.isfinite(torch.tensor(metrics["loss"]))


def test_sigterm_during_a_run_leaves_a_loadable_checkpoint(tmp_path):
    run_dir = tmp_path / "sig"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moealign.cli",
            "train",
            "--config",
            str(CONFIGS / "tiny.toml"),
            "--set",
            "train.steps=100000",
            "--set",
            "train.checkpoint_every=0",
            "--set",
            "train.log_every=1",
            "--out",
            str(run_dir),
            "--no-progress",
        ],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (
        metrics.exists() and metrics.read_text().count("\n") >= 2
    ):
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr  # 128 + SIGTERM, after checkpointing
    assert "interrupted" in stdout and "Traceback" not in stderr
    checkpoint = load_latest(run_dir / "checkpoints")
    assert checkpoint is not None and checkpoint.step >= 2
    assert max(r["step"] for r in read_records(run_dir)) == checkpoint.step
