"""`moealign eval` evaluates a checkpoint exactly as training did (one LM evaluation function,
the run's precision, the layout of final_eval.json), and rejects bad counts with one line."""

import json

import pytest

from helpers_cli import run_cli
from helpers_train import tiny_config
from moealign.config import ConfigError
from moealign.data.build import build_training_data
from moealign.evaluation.lm import evaluate_lm
from moealign.evaluation.run import evaluate_run, load_run_model
from moealign.training.trainer import Trainer


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    """A finished run trained and evaluated under bf16 autocast (train.precision=bf16)."""
    tmp_path = tmp_path_factory.mktemp("eval")
    config = tiny_config(
        tmp_path, "train.steps=3", "train.precision=bf16", "train.task_eval_examples=1"
    )
    result = Trainer(config, progress=False).train()
    return result.run_dir, result.final_eval


def test_eval_gives_the_training_validation_loss_of_the_same_checkpoint(bf16_run):
    run_dir, final = bf16_run
    result = evaluate_run(run_dir)
    # The same function on the same weights, batches and bf16 kernels: equal bit for bit.
    assert result["val_loss"] == final["val_loss"]
    for key in ("val_ppl", "val_tokens", "val_routing/max_vio", "val_routing/token_entropy"):
        assert result[key] == final[key], key
    assert (
        result["val_routing/layer1/projection_alignment"]
        == (final["val_routing/layer1/projection_alignment"])
    )
    assert result["expert_counts"] == final["expert_counts"]
    assert result["task_accuracy"] == final["task_accuracy"]
    # One layout for final_eval.json and eval.json (beyond the run's own bookkeeping).
    own = {"step", "params_total", "params_active", "peak_memory_bytes"}
    assert set(result) == set(final) - own
    assert json.loads((run_dir / "eval.json").read_text())["val_loss"] == final["val_loss"]
    # In fp32 the loss differs: the precision is what made the two disagree before.
    config, model = load_run_model(run_dir)
    assert config.train.precision == "bf16"
    fp32 = evaluate_lm(model, build_training_data(config).validation)
    assert fp32.loss != final["val_loss"]


def test_bad_counts_are_a_config_error_before_anything_loads(bf16_run, tmp_path):
    run_dir, _ = bf16_run
    with pytest.raises(ConfigError, match="--eval-batches: got 0; expected an integer >= 1"):
        evaluate_run(run_dir, eval_batches=0)
    with pytest.raises(ConfigError, match="--task-examples: got -5; expected an integer >= 0"):
        evaluate_run(run_dir, task_examples=-5)
    result = run_cli("eval", str(run_dir), "--eval-batches", "0", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: moealign eval: argument --eval-batches: got 0; expected an integer >= 1 "
        "and <= 10,000 (see moealign eval --help)"
    ]
