"""Alignment in the training loop: router options from config, per-task routing entropy in the
step metrics, the guardrail's line in the CLI's progress output."""

import copy
import math

import pytest
import torch
from safetensors.torch import save_file

from helpers_cli import run_cli
from helpers_train import TINY, tiny_config
from moealign.config import load_config
from moealign.data.tasks import TASK_IDS
from moealign.io import read_jsonl
from moealign.nn.transformer import MoETransformer
from moealign.training.trainer import Trainer


def test_gating_temperature_and_logit_dropout_come_from_the_config():
    config = load_config(
        None,
        [*TINY, "model.router_options={temperature = 0.7, logit_dropout = 0.1}"],
    )
    torch.manual_seed(0)
    model = MoETransformer(config.model)
    x_TD = torch.randn(64, config.model.d_model)
    for layer in model.moe_layers:
        router = layer.router
        assert (router.temperature, router.logit_dropout) == (0.7, 0.1)
        reference_TE = x_TD.double() @ router.weight.detach().double().T / 0.7
        router.eval()
        out = router(x_TD)
        torch.testing.assert_close(out.logits.double(), reference_TE, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            out.probs.double(), torch.softmax(reference_TE, -1), atol=1e-5, rtol=1e-5
        )
        # In training, each expert is dropped (logit −inf) with probability p; the kept logits
        # are not rescaled: the same temperature as in evaluation (DESIGN.md §4).
        router.train()
        logits_TE = router(x_TD).logits.detach().double()
        dropped = torch.isneginf(logits_TE)
        assert 0.03 < dropped.double().mean() < 0.2
        torch.testing.assert_close(
            logits_TE[~dropped], reference_TE[~dropped], rtol=1e-5, atol=1e-5
        )


def test_step_metrics_hold_each_tasks_routing_entropy_per_layer(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "train.steps=2"), progress=False)
    batch = next(trainer.data.train)
    before = copy.deepcopy(trainer.model)
    metrics = trainer.train_step(batch)
    routing = before(batch["input_ids"]).routing
    task_ids_T = batch["task_ids"].reshape(-1)
    names = {i: name for name, i in TASK_IDS.items()}
    present = sorted(int(t) for t in task_ids_T.unique() if t >= 0)
    assert present, "the batch holds no task tokens"
    for layer, info in enumerate(routing):
        entropies = []
        for task in present:
            p_E = info.probs.detach().double()[task_ids_T == task].mean(0)
            expected = float(-(p_E * p_E.log()).sum() / math.log(p_E.numel()))
            key = f"routing/layer{layer}/task_entropy/{names[task]}"
            assert metrics[key] == pytest.approx(expected, rel=1e-5), key
            entropies.append(expected)
        assert metrics[f"routing/layer{layer}/router_grad_norm"] > 0  # same 0-based layers
        mean_key = f"routing/layer{layer}/task_entropy"
        assert metrics[mean_key] == pytest.approx(sum(entropies) / len(entropies), rel=1e-5)
    logged = {k for k in metrics if k.startswith("routing/layer") and "/task_entropy/" in k}
    assert logged == {
        f"routing/layer{layer}/task_entropy/{names[task]}"
        for layer in range(len(routing))
        for task in present
    }


def test_guardrail_action_is_printed_by_the_cli_and_logged(tmp_path):
    prior = tmp_path / "collapse.safetensors"
    save_file({"prior": torch.tensor([[0.97, 0.01, 0.01, 0.01]] * 2)}, str(prior))
    overrides = [
        *TINY,
        "model.top_k=1",  # a collapse shows in the usage entropy (see test_alignment.py)
        "train.steps=12",
        "train.task_eval_examples=0",
        "optim.lr=1e-2",
        "loss.balance_coef=0.0",
        "alignment.schedule=fixed",
        "alignment.lambda_target=50.0",
        "alignment.prior=file",
        f"alignment.prior_path={prior}",
        "guardrails.policy=reduce_lambda",
        "guardrails.min_usage_entropy=0.6",
        "guardrails.patience=2",
        "guardrails.cooldown=5",
    ]
    args = [arg for override in overrides for arg in ("--set", override)]
    result = run_cli("train", *args, "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    records = read_jsonl(tmp_path / "run/metrics.jsonl")
    events = [r for r in records if "event" in r]
    assert events and events[0]["action"] == "lambda scale -> 0.5"
    shown = [line for line in result.stdout.splitlines() if line.startswith("guardrail at step")]
    assert len(shown) == len(events)
    assert shown[0].startswith(f"guardrail at step {events[0]['step']}:")
    assert shown[0].endswith("-> lambda scale -> 0.5")
