"""The divergence guard (issues 14.4 and 16): a non-finite loss or gradient is caught every
step; ``train.on_nonfinite`` skips the step or stops the run; no checkpoint on disk ever holds
a non-finite value; ``metrics.jsonl`` stays strict JSON."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from helpers_cli import run_cli
from helpers_train import TINY, tiny_config
from moealign.studies.ablate import classify_run
from moealign.training.callbacks import Callback
from moealign.training.checkpoint import list_checkpoints, load_latest
from moealign.training.objective import LossTerm
from moealign.training.trainer import Trainer


class NaNAt(LossTerm):
    """Adds NaN · (something with a gradient) to the loss at the given steps (0-based, as the
    objective sees them): the loss and every router gradient become NaN there."""

    def __init__(self, *steps: int):
        self.steps = set(steps)

    def __call__(self, batch, output, step):
        scale = math.nan if step in self.steps else 0.0
        return {"nan_probe": scale * sum(r.probs.mean() for r in output.routing)}


class Snapshots(Callback):
    """The model's weights and the optimizer's step counters after every step."""

    def __init__(self):
        self.weights, self.optimizer_steps = {}, {}

    def on_step_end(self, trainer, step):
        self.weights[step.step] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        self.optimizer_steps[step.step] = sorted(
            float(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()
        )


def strict_records(run_dir) -> list[dict]:
    """metrics.jsonl, refusing NaN/Infinity as a strict JSON parser does."""

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line, parse_constant=refuse) for line in lines]


def assert_checkpoints_finite(run_dir) -> list[int]:
    steps = []
    for path in list_checkpoints(run_dir / "checkpoints"):
        for name in ("model.safetensors", "optimizer.safetensors"):
            for key, tensor in load_file(str(path / name)).items():
                if tensor.is_floating_point():
                    assert torch.isfinite(tensor).all(), (path.name, name, key)
        steps.append(int(path.name.removeprefix("step_")))
    return steps


COMMON = (
    "train.steps=6",
    "train.checkpoint_every=1",
    "train.keep_checkpoints=2",
    "model.router_options={expert_bias = true}",
)


def test_skip_leaves_the_step_out_and_training_goes_on(tmp_path):
    config = tiny_config(tmp_path, *COMMON, "train.on_nonfinite=skip")
    snapshots = Snapshots()
    trainer = Trainer(config, aux_terms=[NaNAt(2)], callbacks=[snapshots], progress=False)
    result = trainer.train()
    assert result.step == 6 and result.diverged_at is None and result.final_eval
    # Step 3 (the third, 0-based step 2) changed nothing: weights, expert biases and the
    # optimizer's step counters are those of step 2; the steps around it trained.
    for key, value in snapshots.weights[2].items():
        assert torch.equal(value, snapshots.weights[3][key]), key
    assert snapshots.optimizer_steps[3] == snapshots.optimizer_steps[2]
    assert any(not torch.equal(v, snapshots.weights[4][k]) for k, v in snapshots.weights[3].items())
    records = strict_records(result.run_dir)
    events = [r for r in records if r.get("event") == "nonfinite"]
    assert events == [
        {
            "step": 3,
            "event": "nonfinite",
            "policy": "skip",
            "action": "optimizer step skipped",
            "values": ["loss", "grad_norm"],
        }
    ]
    skipped = next(r for r in records if r.get("split") == "train" and r["step"] == 3)
    assert skipped["step_skipped"] is True and skipped["loss"] is None
    assert {"loss", "aux_loss", "grad_norm", "nan_probe"} <= set(skipped["nonfinite"])
    assert "lm_loss" not in skipped["nonfinite"] and skipped["lm_loss"] > 0
    train = [r for r in records if r.get("split") == "train" and r["step"] != 3]
    assert len(train) == 5 and all(r["loss"] is not None for r in train)
    assert assert_checkpoints_finite(result.run_dir) == [5, 6]
    # A skipped step is not a divergence for `ablate`/`report`.
    assert classify_run(result.run_dir) == ("finished", None)


def test_stop_ends_the_run_at_the_step_and_keeps_the_finite_checkpoints(tmp_path):
    config = tiny_config(tmp_path, *COMMON)  # on_nonfinite defaults to stop
    assert config.train.on_nonfinite == "stop"
    result = Trainer(config, aux_terms=[NaNAt(3)], progress=False).train()
    assert result.diverged_at == 4 and result.step == 4 and not result.interrupted
    assert result.final_eval == {} and not (result.run_dir / "final_eval.json").exists()
    assert assert_checkpoints_finite(result.run_dir) == [2, 3]  # no step 4
    records = strict_records(result.run_dir)
    assert records[-1] == {
        "step": 4,
        "event": "nonfinite",
        "policy": "stop",
        "action": "training stopped",
        "values": ["loss", "grad_norm"],
    }
    assert records[-2]["split"] == "train" and records[-2]["loss"] is None
    assert classify_run(result.run_dir) == ("diverged", 4)


class PoisonWeights(Callback):
    """Writes a NaN into a weight after the given step (a corruption that no loss catches
    before the checkpoint of that step)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, step):
        if step.step == self.step:
            with torch.no_grad():
                trainer.model.lm_head.weight[0, 0] = math.nan


def test_a_nonfinite_state_is_never_checkpointed_and_rotation_keeps_the_last_finite(tmp_path):
    config = tiny_config(tmp_path, *COMMON)
    trainer = Trainer(config, callbacks=[PoisonWeights(4)], progress=False)
    result = trainer.train()
    # Step 4's checkpoint is refused (an event); step 5 then meets NaN and stops the run.
    assert result.diverged_at == 5
    assert assert_checkpoints_finite(result.run_dir) == [2, 3]
    assert load_latest(result.run_dir / "checkpoints").step == 3
    events = [r for r in strict_records(result.run_dir) if "event" in r]
    assert events[0]["step"] == 4 and events[0]["action"] == "checkpoint not written"
    assert events[0]["values"] == ["embed.weight", "lm_head.weight"]  # tied: one tensor
    # The run resumes from the last finite checkpoint.
    resumed = Trainer(tiny_config(tmp_path, *COMMON), resume=True, progress=False)
    assert resumed.step == 3 and all(torch.isfinite(p).all() for p in resumed.model.parameters())


@pytest.mark.slow
def test_cli_diverged_run_is_one_error_line_and_a_nonzero_exit(tmp_path):
    overrides = [*TINY, "train.steps=8", "optim.lr=1e4", "optim.warmup_steps=0"]
    overrides += ["train.checkpoint_every=1", "train.keep_checkpoints=2"]
    args = [arg for override in overrides for arg in ("--set", override)]
    run_dir = tmp_path / "run"
    result = run_cli("train", *args, "--out", str(run_dir), "--no-progress", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    event = strict_records(run_dir)[-1]
    assert event["event"] == "nonfinite" and event["policy"] == "stop"
    assert errors[0].startswith(f"error: training diverged at step {event['step']} ")
    assert "finished" not in result.stdout
    steps = assert_checkpoints_finite(run_dir)
    assert steps and max(steps) < event["step"]
