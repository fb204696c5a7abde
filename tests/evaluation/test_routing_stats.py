"""RoutingStats: the one accumulator of routing statistics (DESIGN.md §3–4), against
hand-worked numbers and float64 references; one name per quantity, each in docs/routers.md."""

import copy
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from moealign.evaluation import diagnostics
from moealign.evaluation.routing_stats import (
    ARRAYS,
    STATISTICS,
    MissingStatisticError,
    RoutingStats,
)
from moealign.nn import RoutingInfo, precompute_routers
from moealign.nn.transformer import ModelConfig, MoETransformer

ROUTERS_PAGE = Path(__file__).resolve().parents[2] / "docs" / "routers.md"


def routing_of(counts_LE, probs=None, balance=1.0, z=0.0) -> list[RoutingInfo]:
    """RoutingInfo per layer with the given expert counts (T = the counts' total / K, K = 1)."""
    infos = []
    for counts_E in torch.as_tensor(counts_LE, dtype=torch.float64):
        tokens = int(counts_E.sum())
        n_experts = counts_E.shape[0]
        probs_TE = torch.full((tokens, n_experts), 1 / n_experts) if probs is None else probs
        infos.append(
            RoutingInfo(
                logits=probs_TE.log(),
                probs=probs_TE,
                topk_idx=torch.zeros(tokens, 1, dtype=torch.long),
                topk_weight=torch.ones(tokens, 1),
                keep=None,
                expert_counts=counts_E,
                load_balance_loss=torch.tensor(balance),
                z_loss=torch.tensor(z),
            )
        )
    return infos


def test_max_vio_global_vs_batch_on_opposite_imbalances():
    stats = RoutingStats(2, 4)
    # Two layers; batch 1 overloads experts 0 / 2, batch 2 the mirror image.
    stats.add(routing_of([[6, 2, 0, 0], [0, 0, 8, 0]], balance=1.5, z=2.0))
    stats.add(routing_of([[0, 0, 2, 6], [8, 0, 0, 0]], balance=0.5, z=4.0))
    summary = stats.summary()
    # Totals [[6,2,2,6],[8,0,8,0]]: MaxVio (6-4)/4 = 0.5 and (8-4)/4 = 1.
    assert summary.max_vio.tolist() == [0.5, 1.0]
    # Each batch: layer 0 (6-2)/2 = 2, layer 1 (8-2)/2 = 3, in both batches.
    assert summary.max_vio_batch.tolist() == [2.0, 3.0]
    assert summary.expert_counts.tolist() == [[6, 2, 2, 6], [8, 0, 8, 0]]
    assert summary.dead_experts.tolist() == [0, 2]
    assert summary.usage_entropy[1].item() == pytest.approx(0.5)  # two of four experts used
    assert summary.balance_loss.tolist() == [1.0, 1.0] and summary.z_loss.tolist() == [3.0, 3.0]
    assert summary.token_entropy.tolist() == pytest.approx([1.0, 1.0])  # uniform probs
    record = summary.record("val_routing/")
    assert record["val_routing/max_vio"] == 0.75 and record["val_routing/layer1/max_vio"] == 1.0
    assert record["val_routing/max_vio_batch"] == 2.5
    assert (summary.tokens, summary.batches) == (16, 2)


def test_task_entropy_and_token_entropy_match_a_float64_reference():
    generator = torch.Generator().manual_seed(0)
    probs_TE = torch.softmax(torch.randn(12, 4, generator=generator) * 2, -1)
    task_ids = torch.tensor([0, 0, 1, 1, 1, -1, 2, 2, 0, 1, -1, 2])
    stats = RoutingStats(1, 4, task_names=["a", "b", "c", "unused"])
    stats.add(routing_of([[3, 3, 3, 3]], probs=probs_TE), task_ids)
    summary = stats.summary()
    p = probs_TE.double().numpy()
    for task, name in enumerate("abc"):
        mean = p[task_ids.numpy() == task].mean(0)
        expected = -(mean * np.log(mean)).sum() / math.log(4)
        # rel 1e-7: diagnostics normalises by log E computed in float32
        assert summary.task_entropy[name].item() == pytest.approx(expected, rel=1e-7)
    assert set(summary.task_entropy) == {"a", "b", "c"}  # only tasks present
    token = -(p * np.log(p)).sum(-1).mean() / math.log(4)
    assert summary.token_entropy.item() == pytest.approx(token, rel=1e-7)
    record = summary.record("routing/")
    assert record["routing/layer0/task_entropy/b"] == summary.task_entropy["b"].item()
    assert record["routing/task_entropy"] == pytest.approx(
        np.mean([summary.task_entropy[n].item() for n in "abc"])
    )
    assert "routing/task_entropy/b" not in record  # per task only per layer


def test_one_reduction_over_ranks_equals_one_process():
    batches = [
        (routing_of([[5, 1, 1, 1]], balance=1.2), torch.zeros(8, dtype=torch.long)),
        (routing_of([[1, 1, 1, 5]], balance=0.8), torch.ones(8, dtype=torch.long)),
        (routing_of([[2, 2, 2, 2]], balance=1.0), torch.zeros(8, dtype=torch.long)),
    ]
    whole = RoutingStats(1, 4, task_names=["a", "b"])
    for routing, task_ids in batches:
        whole.add(routing, task_ids)
    ranks = [RoutingStats(1, 4, task_names=["a", "b"]) for _ in range(2)]
    ranks[0].add(*batches[0])
    ranks[1].add(*batches[1])
    ranks[1].add(*batches[2])
    calls = []

    def all_reduce_sum(tensor):  # what every rank's buffer becomes after the collective
        calls.append(tensor)
        tensor.copy_(ranks[0].buffer + ranks[1].buffer)
        return tensor

    ranks[0].reduce(all_reduce_sum)
    assert len(calls) == 1  # one collective for every statistic
    expected, got = whole.summary(), ranks[0].summary()
    assert got.record("r/") == pytest.approx(expected.record("r/"))
    assert got.expert_counts.tolist() == expected.expert_counts.tolist()
    idle = RoutingStats(1, 4)  # a rank without batches joins with zeros
    assert not idle.buffer.any()
    with pytest.raises(ValueError, match="no routing was recorded"):
        idle.summary()


def test_missing_statistics_and_shapes_are_errors():
    stats = RoutingStats(2, 4)
    with pytest.raises(ValueError, match="routing of 1 layers; expected 2"):
        stats.add(routing_of([[1, 1, 1, 1]]))
    stats.add(routing_of([[1, 1, 1, 1], [1, 1, 1, 1]]))
    summary = stats.summary()
    for name in ("router_grad_norm", "projection_alignment", "task_entropy"):
        with pytest.raises(MissingStatisticError, match=name):
            summary.require(name)
    assert summary.require("usage_entropy").tolist() == pytest.approx([1.0, 1.0])


def tiny(router: str) -> MoETransformer:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=64, d_model=16, n_layers=2, n_heads=2, max_seq_len=16, expert_d_ff=8,
        n_experts=4, top_k=2, router=router,
    )  # fmt: skip
    return MoETransformer(config)


def test_projection_alignment_of_raw_powered_and_precomputed_rows():
    mpi = tiny("mpi")
    stats = RoutingStats(2, 4)
    stats.add(mpi(torch.randint(0, 64, (2, 8))).routing)
    summary = stats.summary().with_projection_alignment(mpi)
    for layer, moe in enumerate(mpi.moe_layers):
        w_gate = moe.experts.w_gate
        raw = diagnostics.projection_alignment(moe.router.weight, w_gate).mean()
        powered_rows = moe.router.effective_weight(moe.router_drive_matrix())
        powered = diagnostics.projection_alignment(powered_rows, w_gate).mean()
        assert summary.projection_alignment_raw[layer].item() == pytest.approx(raw.item())
        assert summary.projection_alignment[layer].item() == pytest.approx(powered.item())
        # The power step aligns the rows with W_g's top singular direction (DESIGN.md §3).
        assert summary.projection_alignment[layer] > summary.projection_alignment_raw[layer]
    # R_eff folded into a plain router: its stored rows are the powered rows.
    precomputed = precompute_routers(copy.deepcopy(mpi))
    folded = RoutingStats(2, 4)
    folded.add(precomputed(torch.randint(0, 64, (2, 8))).routing)
    folded_summary = folded.summary().with_projection_alignment(precomputed)
    torch.testing.assert_close(
        folded_summary.projection_alignment_raw, summary.projection_alignment
    )
    torch.testing.assert_close(folded_summary.projection_alignment, summary.projection_alignment)
    # A plain router: raw and effective rows are the same rows.
    plain = tiny("softmax_topk")
    plain_stats = RoutingStats(2, 4)
    plain_stats.add(plain(torch.randint(0, 64, (2, 8))).routing)
    plain_summary = plain_stats.summary().with_projection_alignment(plain)
    assert plain_summary.projection_alignment.tolist() == (
        plain_summary.projection_alignment_raw.tolist()
    )


def test_every_name_is_documented_and_records_use_only_them():
    page = ROUTERS_PAGE.read_text()
    for name in [*STATISTICS, *ARRAYS]:
        assert re.search(rf"`{re.escape(name)}`", page), f"docs/routers.md lacks {name}"
    stats = RoutingStats(1, 4, task_names=["copy"])
    stats.add(routing_of([[2, 2, 2, 2]]), torch.zeros(8, dtype=torch.long))
    summary = stats.summary()
    summary.router_grad_norm = torch.ones(1, dtype=torch.float64)
    record = summary.with_projection_alignment(None).record("routing/")
    names = {key.removeprefix("routing/").removeprefix("layer0/") for key in record}
    assert names - {"task_entropy/copy"} <= set(STATISTICS)
