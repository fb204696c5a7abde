"""TensorBoard and offline W&B mirrors of metrics.jsonl."""

from __future__ import annotations

import math
import sys
import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers_cli import CONFIGS
from moealign.config import ConfigError, TrainConfig, load_config
from moealign.io import read_jsonl
from moealign.training.loggers import TensorBoardLogger, WandbLogger, build_loggers, scalar_tags
from moealign.training.trainer import Trainer

RECORDS = [
    {"step": 1, "split": "train", "loss": 3.5, "routing/max_vio": 0.25, "lr": 1e-3},
    {"step": 2, "split": "train", "loss": 3.0, "routing/max_vio": 0.5, "lr": 2e-3},
    {"step": 2, "split": "val", "val_loss": 2.75, "val_routing/max_vio": 0.125},
]


def _scalars(log_dir, tag):
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def test_scalar_tags_put_the_split_first_once_and_skip_non_numbers():
    step, tags = scalar_tags(
        {"step": 4, "split": "val", "val_loss": 2.5, "val_routing/layer0/max_vio": 1, "ok": True}
    )
    assert step == 4 and tags == {"val/loss": 2.5, "val/routing/layer0/max_vio": 1.0}
    step, tags = scalar_tags({"step": 7, "event": "collapse", "layer": 1, "loss": math.nan})
    assert step == 7 and set(tags) == {"event/layer", "event/loss"}
    assert math.isnan(tags["event/loss"])


def test_tensorboard_event_file_holds_the_logged_scalars(tmp_path):
    logger = TensorBoardLogger(tmp_path / "tb")
    for record in RECORDS:
        logger.log(record)
    logger.close()
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1
    assert _scalars(tmp_path / "tb", "train/loss") == [(1, 3.5), (2, 3.0)]
    assert _scalars(tmp_path / "tb", "train/routing/max_vio") == [(1, 0.25), (2, 0.5)]
    assert _scalars(tmp_path / "tb", "val/loss") == [(2, 2.75)]


def test_wandb_offline_writes_its_run_inside_the_run_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    logger = WandbLogger(tmp_path, name="unit", config={"optim": {"lr": 1e-3}})
    for record in RECORDS:
        logger.log(record)
    logger.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    (history,) = runs[0].glob("run-*.wandb")
    tags = (b"train/loss", b"train/routing/max_vio", b"val/loss")
    # wandb-core writes the history file from its own process, shortly after finish().
    deadline = time.monotonic() + 30
    while not all(tag in history.read_bytes() for tag in tags) and time.monotonic() < deadline:
        time.sleep(0.2)
    data = history.read_bytes()
    assert data.startswith(b":W&B") and all(tag in data for tag in tags)


def test_a_switched_on_logger_whose_package_is_missing_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    with pytest.raises(ConfigError, match=r"train\.wandb.*'wandb'.*moealign\[logging\]"):
        build_loggers(TrainConfig(wandb=True), tmp_path, run_name="x", config={})
    assert build_loggers(TrainConfig(), tmp_path, run_name="x", config={}).loggers == []


def test_trainer_mirrors_metrics_jsonl_to_tensorboard(tmp_path):
    overrides = [
        "train.steps=3",
        "optim.warmup_steps=1",
        "train.log_every=1",
        "train.eval_every=2",
        "data.source=tasks",
        "data.examples_per_task=10",
        "train.device=cpu",
        "train.tensorboard=true",
    ]
    trainer = Trainer(load_config(CONFIGS / "tiny.toml", overrides), run_dir=tmp_path / "run")
    trainer.train()
    trainer.close()
    records = read_jsonl(tmp_path / "run/metrics.jsonl")
    train = [(r["step"], r["loss"]) for r in records if r["split"] == "train"]
    logged = _scalars(tmp_path / "run/tensorboard", "train/loss")
    assert [step for step, _ in logged] == [step for step, _ in train] == [1, 2, 3]
    assert [value for _, value in logged] == pytest.approx([loss for _, loss in train], rel=1e-6)
    val = [(r["step"], r["val_loss"]) for r in records if r["split"] == "val"]
    assert [s for s, _ in _scalars(tmp_path / "run/tensorboard", "val/loss")] == [s for s, _ in val]
