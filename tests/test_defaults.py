"""Built-in defaults that train, and a warm-up longer than a shortened run (issue 25)."""

from __future__ import annotations

import json

import pytest

from helpers_cli import run_cli
from moealign import progress
from moealign.config import RunConfig, load_config
from moealign.data.batching import encode_example
from moealign.data.build import build_data_suite, build_data_tokenizer, formatted_examples
from moealign.studies.demo import demo_config_path


def test_every_default_training_example_fits_the_default_seq_len():
    """Independent of the data pipeline's own check: encode every training and validation
    example of the default suite with the default tokenizer and count its tokens."""
    config = RunConfig()
    tokenizer = build_data_tokenizer(config.data, documents=[])
    suite = build_data_suite(config.data)
    longest = max(
        len(sum(encode_example(example, tokenizer), [])) - 1
        for examples in (suite.train, suite.val)
        for example in formatted_examples(config.data, examples)
    )
    assert longest > 64  # the old default (64) was too short for the default suite
    assert longest <= config.train.seq_len <= config.model.max_seq_len


@pytest.fixture
def fresh_notes(monkeypatch):
    monkeypatch.setattr(progress, "_NOTED", set())


def test_a_warmup_longer_than_the_run_is_clamped_with_a_note(capsys, fresh_notes):
    """``moealign demo --seeds 0 1 --set train.steps=40``: configs/demo.toml warms up over 50
    steps; the demo's config loads with the warm-up clamped to the run and one note line."""
    config = load_config(demo_config_path(), ["train.steps=40"])
    assert config.optim.warmup_steps == 40 and config.to_dict()["optim"]["warmup_steps"] == 40
    load_config(demo_config_path(), ["train.steps=40"])  # a second build notes nothing new
    err = capsys.readouterr().err
    assert err == "note: optim.warmup_steps=50 > train.steps=40; using 40\n"
    # a warm-up within the run is left alone and silent
    assert load_config(demo_config_path(), ["train.steps=50"]).optim.warmup_steps == 50
    assert capsys.readouterr().err == ""


def test_an_empty_config_file_is_the_built_in_defaults(tmp_path):
    (tmp_path / "empty.toml").write_text("")
    assert load_config(tmp_path / "empty.toml") == load_config(None) == RunConfig()


@pytest.mark.slow
def test_train_runs_from_the_built_in_defaults(tmp_path):
    """``moealign train --out DIR`` (no config) trains the default model on the default data;
    shrunk to 3 steps (the default warm-up of 10 is clamped)."""
    shrink = ["train.steps=3", "train.task_eval_examples=1", "train.eval_batches=1"]
    done = run_cli(
        "train",
        "--out",
        str(tmp_path / "run"),
        *(arg for key in shrink for arg in ("--set", key)),
        cwd=tmp_path,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "note: optim.warmup_steps=10 > train.steps=3; using 3" in done.stderr
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    defaults = RunConfig().to_dict()
    assert recorded["model"] == defaults["model"] and recorded["data"] == defaults["data"]
    assert recorded["train"]["seq_len"] == defaults["train"]["seq_len"]
    assert json.loads((tmp_path / "run" / "final_eval.json").read_text())["step"] == 3
