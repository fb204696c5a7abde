"""The loop's seams: the callback protocol (what runs when), the objective's typed loss terms,
and the step-0 evaluation that gives every routing statistic, λ included, its start value."""

from __future__ import annotations

import json

import pytest
import torch

from helpers_train import tiny_config
from moealign.evaluation.diagnostics import routing_projection_alignment
from moealign.nn.transformer import MoETransformer
from moealign.training.callbacks import Callback
from moealign.training.objective import LossTerm, Objective
from moealign.training.trainer import Trainer


class Recorder(Callback):
    def __init__(self):
        self.calls: list[tuple] = []

    def on_train_start(self, trainer):
        self.calls.append(("start", trainer.step))

    def on_optimizer_step(self, trainer, applied):
        self.calls.append(("optimizer", trainer.step, applied))

    def on_step_end(self, trainer, step):
        assert step.routing is not None and step.routing.router_grad_norm is not None
        self.calls.append(("step", step.step, sorted(step.routing.task_entropy) != []))

    def on_evaluation(self, trainer, evaluation):
        self.calls.append(("evaluation", trainer.step, evaluation.tokens > 0))

    def on_log(self, trainer, record):
        self.calls.append(("log", record["step"], record.get("split", record.get("event"))))

    def on_train_end(self, trainer, result):
        self.calls.append(("end", result.step, bool(result.final_eval)))


def test_callbacks_run_in_order_around_each_step(tmp_path):
    config = tiny_config(tmp_path, "train.steps=3", "train.eval_every=2", "train.log_every=2")
    recorder = Recorder()
    trainer = Trainer(config, callbacks=[recorder], progress=False)
    result = trainer.train()
    assert recorder.calls == [
        ("evaluation", 0, True),  # the step-0 record, by a built-in (they run first)
        ("log", 0, "val"),
        ("start", 0),
        ("optimizer", 0, True),  # inside step 1, after the optimizer step
        ("step", 1, True),
        ("optimizer", 1, True),
        ("log", 2, "train"),
        ("evaluation", 2, True),
        ("log", 2, "val"),
        ("step", 2, True),
        ("optimizer", 2, True),
        ("log", 3, "train"),  # the last step is always logged
        ("step", 3, True),
        ("evaluation", 3, True),  # the final evaluation
        ("log", 3, "val"),
        ("end", 3, True),
    ]
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").open()]
    assert [(r["step"], r["split"]) for r in lines] == [
        (0, "val"), (2, "train"), (2, "val"), (3, "train"), (3, "val"),
    ]  # fmt: skip
    trainer.close()


def test_step_zero_record_holds_the_starting_projection_alignment(tmp_path):
    config = tiny_config(tmp_path, "train.steps=2", "model.router=mpi", "train.eval_every=1")
    torch.manual_seed(config.train.seed)
    initial = MoETransformer(config.model)  # the trainer's model before its first step
    result = Trainer(config, progress=False).train()
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").open()]
    val = {r["step"]: r for r in records if r.get("split") == "val"}
    assert sorted(val) == [0, 1, 2]
    start = val[0]
    effective = routing_projection_alignment(initial, "effective")
    raw = routing_projection_alignment(initial, "raw")
    for layer in (0, 1):
        assert start[f"val_routing/layer{layer}/projection_alignment"] == pytest.approx(
            effective[layer]
        )
        assert start[f"val_routing/layer{layer}/projection_alignment_raw"] == pytest.approx(
            raw[layer]
        )
        # An untrained MPI router is already well aligned (the power step), the raw rows not:
        # a training effect is the change from here.
        assert effective[layer] > raw[layer]
    assert start["val_loss"] > 0 and "val_routing/max_vio" in start
    for step in (1, 2):
        assert "val_routing/projection_alignment_raw" in val[step]


class Stateless(LossTerm):
    def __call__(self, batch, output, step):
        return {"zero_term": output.logits.sum() * 0.0}


def test_objective_takes_typed_loss_terms_only(tmp_path):
    class DuckTyped:  # the old duck-typed aux term: a bare callable
        def __call__(self, batch, output, step):
            return {}

    with pytest.raises(TypeError, match="DuckTyped is not a LossTerm.*end_step, metrics"):
        Objective(0.01, 0.001, [DuckTyped()])
    config = tiny_config(tmp_path, "alignment.schedule=fixed")
    objective = Objective.from_config(config, 2, 4, [Stateless()])
    assert isinstance(objective.terms[0], Stateless) and objective.alignment is objective.terms[1]
    assert objective.state_dict()[0] == {}
    trainer = Trainer(config, aux_terms=[Stateless()], progress=False)
    metrics = trainer.train_step(next(trainer.data.train))
    assert metrics["zero_term"] == 0.0 and metrics["lambda"] == config.alignment.lambda_target
    expected = 1e-2 * metrics["balance_loss"] + 1e-3 * metrics["z_loss"] + metrics["align_loss"]
    assert metrics["aux_loss"] == pytest.approx(expected, rel=1e-6)
    assert metrics["loss"] == pytest.approx(metrics["lm_loss"] + metrics["aux_loss"], rel=1e-9)
