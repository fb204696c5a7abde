"""A tiny torchtitan Qwen3 MoE (torchtitan's model, loss, optimizer, checkpointer and metrics
logger) trained on CPU with moealign's MPI router, alignment term and routing statistics: the
code of examples/torchtitan_mpi.py. Also reads its DCP checkpoint into moealign's layout."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp

pytest.importorskip("torchtitan")

from helpers_torchtitan import load_example  # noqa: E402
from moealign.engines.torchtitan import read_checkpoint, to_moe_layer  # noqa: E402


@pytest.fixture(scope="module")
def example():
    return load_example()


@pytest.fixture(scope="module")
def full_run(example, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    return out, example.train(out, 50, checkpoint_every=25)


@pytest.mark.slow
def test_loss_falls_alignment_rises_and_statistics_reach_torchtitans_logger(full_run):
    out, history = full_run
    assert [row["step"] for row in history] == list(range(51))
    first, last = history[1], history[-1]
    assert last["lm_loss"] < 0.8 * first["lm_loss"]
    # projection alignment λ′ of the MPI rows, read from step 0 (before any update)
    assert history[0]["moe/projection_alignment"] < last["moe/projection_alignment"]
    assert last["moealign/lambda"] == pytest.approx(0.1) and history[1]["moealign/lambda"] == 0
    names = ("max_vio", "max_vio_batch", "dead_experts", "usage_entropy", "token_entropy")
    names += ("projection_alignment", "projection_alignment_raw", "utilisation_min")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "tb").rglob("events.*")).parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for name in names:
        assert f"moe/{name}" in tags and f"moe/layer1/{name}" in tags or name.startswith("util")
    logged = events.Scalars("moe/max_vio")
    assert [e.step for e in logged] == list(range(51))
    assert logged[-1].value == pytest.approx(last["moe/max_vio"], rel=1e-6)


@pytest.mark.slow
def test_resume_from_torchtitans_dcp_checkpoint_continues_bit_for_bit(example, full_run, tmp_path):
    out, history = full_run
    saved = out / "checkpoint" / "step-25"
    assert (saved / ".metadata").is_file()
    shutil.copytree(saved, tmp_path / "checkpoint" / "step-25")  # as if stopped after step 25
    resumed = example.train(tmp_path, 50, checkpoint_every=25)
    assert [row["step"] for row in resumed] == list(range(26, 51))
    for got, expected in zip(resumed, history[26:], strict=True):
        assert got == expected  # every loss and statistic, exactly


@pytest.mark.slow
def test_dcp_checkpoint_reads_into_moealigns_layout(example, full_run):
    out, _ = full_run
    layers = read_checkpoint(out / "checkpoint" / "step-50")
    assert sorted(layers) == ["layers.0.moe", "layers.1.moe"]
    weights = layers["layers.1.moe"]
    assert weights["router"].shape == (example.EXPERTS, example.DIM)
    assert weights["w_gate"].shape == (example.EXPERTS, example.HIDDEN, example.DIM)
    layer = to_moe_layer(weights, example.TOP_K, "mpi")
    model = example.tiny_qwen3_moe({"c_prime": 4.0}).build()
    state = model.state_dict()  # loaded by DCP itself, the independent path
    dcp.load(state, checkpoint_id=str(out / "checkpoint" / "step-50"), no_dist=True)
    model.load_state_dict(state)
    moe = model.layers["1"].moe
    x = torch.randn(2, 5, example.DIM)
    with torch.no_grad():
        _, _, scores = moe.router(x, None)
        y_tt = moe(x)
        y_ma, info = layer(x)
    torch.testing.assert_close(scores.reshape(-1, example.EXPERTS), info.probs)
    torch.testing.assert_close(y_tt, y_ma, rtol=0.05, atol=2e-3)  # torchtitan's experts: bf16
