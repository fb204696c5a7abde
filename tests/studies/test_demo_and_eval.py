"""The main job (`moealign demo`) and `moealign eval RUN_DIR`, end to end on tiny models."""

import json

import matplotlib.image
import pytest

from helpers_cli import run_cli
from moealign.config import load_config
from moealign.evaluation.run import evaluate_run
from moealign.studies.demo import run_demo, variant_configs

TINY_DEMO = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.n_experts=4",
    "model.expert_d_ff=32",
    "model.max_seq_len=128",
    "data.examples_per_task=40",
    "data.text_max_bytes=1000000",
    "train.seq_len=96",
    "train.batch_size=8",
    "train.steps=4",
    "train.eval_every=2",
    "train.eval_batches=1",
    "train.log_every=1",
    "train.checkpoint_every=0",
    "train.task_eval_examples=1",
    "optim.warmup_steps=1",
]


def test_variants_have_matched_active_size():
    base = load_config(None, ["model.ffn=moe", "model.top_k=2", "model.expert_d_ff=64"])
    variants = variant_configs(base)
    assert variants["dense"].model.ffn == "dense" and variants["dense"].model.d_ff == 128
    assert variants["moe_mpi"].model.router == "mpi"
    assert variants["moe_softmax_topk"].model.router == "softmax_topk"


@pytest.mark.slow
def test_demo_trains_three_models_writes_table_and_plot_and_reuses_finished_runs(tmp_path):
    out = tmp_path / "demo"
    summaries = run_demo(out, overrides=TINY_DEMO, progress=False)
    assert list(summaries) == ["dense", "moe_softmax_topk", "moe_mpi"]
    dense, moe = summaries["dense"], summaries["moe_softmax_topk"]
    assert dense["params_total"] == dense["params_active"]
    assert moe["params_active"] < moe["params_total"]
    assert dense["max_vio"] is None and moe["max_vio"] >= 0
    assert 0.0 <= moe["task_accuracy_seen"] <= 1.0
    table = (out / "summary.md").read_text()
    assert all(f"| {name} |" in table for name in summaries)
    assert json.loads((out / "summary.json").read_text()) == summaries
    assert matplotlib.image.imread(out / "loss_curves.png").shape[-1] in (3, 4)
    before = (out / "moe_mpi" / "final_eval.json").stat().st_mtime_ns
    assert run_demo(out, overrides=TINY_DEMO, progress=False) == summaries
    assert (out / "moe_mpi" / "final_eval.json").stat().st_mtime_ns == before

    # `moealign eval` on one of the runs: same validation loss as the run's own final eval
    result = evaluate_run(out / "moe_mpi", task_examples=1)
    final = json.loads((out / "moe_mpi" / "final_eval.json").read_text())
    assert result["val_loss"] == pytest.approx(final["val_loss"], rel=1e-5)
    key = "val_routing/layer1/projection_alignment"
    assert result[key] == pytest.approx(final[key])
    assert set(result["tasks"]["sets"]) >= {"test", "heldout_tasks"}
    written = json.loads((out / "moe_mpi" / "eval.json").read_text())
    assert (
        written["val_loss"] == result["val_loss"]
        and written["expert_counts"] == (final["expert_counts"])
    )
    cli = run_cli("eval", str(out / "moe_mpi"), "--task-examples", "1", cwd=tmp_path)
    assert cli.returncode == 0, cli.stderr
    assert "val perplexity" in cli.stdout and "projection alignment" in cli.stdout


def test_eval_of_a_directory_without_a_run_is_a_clear_error(tmp_path):
    result = run_cli("eval", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2
    assert "no config.json" in result.stderr and "Traceback" not in result.stderr
