"""``train.activation_checkpointing`` and ``train.compile`` in the trainer: recorded in the run,
the same training as without them, exact resume, plain parameter names in checkpoints, and one
clear error for a bad value or a machine where the compiler cannot run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from helpers_cli import cli_env
from helpers_train import tiny_config
from moealign.config import ConfigError
from moealign.nn.compile import compile_unavailable_reason
from moealign.training.checkpoint import MODEL_FILE, load_latest
from moealign.training.trainer import Trainer

# Expert-bias counts and router jitter: a forward side effect and a random draw per forward.
ROUTING = ["model.router_options={expert_bias = true, jitter = 0.1}"]


def _train(tmp_path, name: str, *overrides: str, stop_at=None, resume=False):
    config = tiny_config(
        tmp_path,
        f"name={name}",
        "train.steps=4",
        "train.checkpoint_every=2",
        "train.task_eval_examples=0",
        *ROUTING,
        *overrides,
    )
    trainer = Trainer(config, resume=resume, progress=False)
    return trainer, trainer.train(stop_at=stop_at)


def _assert_same_weights(a: Trainer, b: Trainer) -> None:
    state_a, state_b = a.model.state_dict(), b.model.state_dict()
    assert state_a.keys() == state_b.keys()
    for name, value in state_a.items():
        assert torch.equal(value, state_b[name]), name


def _assert_resumes_exactly(tmp_path, *overrides: str) -> Trainer:
    straight, _ = _train(tmp_path, "straight", *overrides)
    assert _train(tmp_path, "split", *overrides, stop_at=2)[1].interrupted
    resumed, result = _train(tmp_path, "split", *overrides, resume=True)
    assert result.step == 4 and not result.interrupted
    _assert_same_weights(straight, resumed)
    return straight


def _losses(trainer: Trainer) -> list[float]:
    lines = (trainer.run_path / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r.get("split") == "train"]


def _checkpoint_keys(trainer: Trainer) -> set[str]:
    checkpoint = load_latest(trainer.run_path / "checkpoints")
    with safe_open(str(checkpoint.path / MODEL_FILE), "pt") as saved:
        return set(saved.keys())


def test_bad_values_are_one_config_error(tmp_path):
    with pytest.raises(ConfigError) as error:
        tiny_config(tmp_path, "train.activation_checkpointing=selective")
    message = str(error.value)
    assert message.startswith("train.activation_checkpointing: got 'selective'")
    assert "'none', 'full', 'moe'" in message and "\n" not in message
    with pytest.raises(ConfigError, match="train.compile: got 'yes'; expected true or false"):
        tiny_config(tmp_path, 'train.compile="yes"')


@pytest.mark.parametrize("mode", ["full", pytest.param("moe", marks=pytest.mark.slow)])
def test_checkpointed_run_trains_as_without_and_resumes_exactly(tmp_path, mode):
    checkpointed = _assert_resumes_exactly(tmp_path, f"train.activation_checkpointing={mode}")
    recorded = json.loads((checkpointed.run_path / "config.json").read_text())
    assert recorded["train"]["activation_checkpointing"] == mode
    assert recorded["train"]["compile"] is False
    plain, _ = _train(tmp_path, "plain")
    # The same routing and forward, gradients equal up to fp32 summation order (see
    # tests/nn/test_checkpointing.py): the losses of four steps agree to fp32 tolerance.
    assert _losses(checkpointed) == pytest.approx(_losses(plain), rel=1e-5)


@pytest.mark.slow
def test_compiled_run_trains_evaluates_saves_plain_names_and_resumes_exactly(tmp_path):
    unavailable = compile_unavailable_reason("cpu")
    if unavailable is not None:
        pytest.skip(f"torch.compile cannot run here: {unavailable}")
    torch._dynamo.reset()
    # Bit for bit: compiled and resumed runs use the same compiled kernels on the same shapes.
    compiled = _assert_resumes_exactly(tmp_path, "train.compile=true", "train.eval_every=2")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # compiled, not eager
    evaluations = [
        json.loads(line)
        for line in (compiled.run_path / "metrics.jsonl").read_text().splitlines()
        if json.loads(line).get("split") == "val"
    ]
    assert [r["step"] for r in evaluations] == [0, 2, 4]
    assert all(r["val_loss"] > 0 for r in evaluations)
    plain, _ = _train(tmp_path, "plain", "train.eval_every=2")
    saved = {run: _checkpoint_keys(run) for run in (compiled, plain)}
    assert saved[compiled] == saved[plain]
    assert saved[compiled] <= set(plain.model.state_dict())
    # Inductor fuses and reorders floating-point operations: close to eager, not equal.
    assert _losses(compiled) == pytest.approx(_losses(plain), rel=1e-4)


def test_compile_where_the_compiler_cannot_run_is_one_error_before_work(tmp_path):
    # A real compiler failure: inductor is pointed at a C++ compiler that does not exist, with
    # its caches off so that the preflight's test function is really compiled.
    env = {
        **cli_env(),
        "CXX": str(tmp_path / "no-such-c++"),
        "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "moealign.cli", "train", "--set", "train.compile=true"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith("error: train.compile: got true, but torch.compile cannot run")
    assert "no-such-c++" in errors[0]
    assert not (tmp_path / "runs").exists()
