"""moealign's routing alignment term in Megatron's aux-loss path and the routing statistics of
:class:`RoutingRecorder` (issue 22), on one Megatron ``MoELayer``."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron.core.transformer.moe.moe_utils import (  # noqa: E402
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
)

from helpers_megatron import (  # noqa: E402
    D_MODEL,
    N_EXPERTS,
    TOP_K,
    megatron_moe_layer,
    megatron_parallel,
    tiny_config,
)
from moealign.alignment.guardrails import RoutingGuardrail  # noqa: E402
from moealign.alignment.loss import routing_alignment_loss  # noqa: E402
from moealign.alignment.term import RoutingAlignment, RoutingPrior  # noqa: E402
from moealign.config import GuardrailConfig  # noqa: E402
from moealign.engines.megatron import RoutingRecorder, drive_matrix, mpi_router  # noqa: E402
from moealign.evaluation import diagnostics  # noqa: E402
from moealign.optim.schedules import LambdaSchedule  # noqa: E402


@pytest.fixture(scope="module")
def parallel():
    with megatron_parallel():
        yield


def _alignment(target: float = 0.3) -> RoutingAlignment:
    return RoutingAlignment(
        RoutingPrior("uniform", 1, N_EXPERTS), LambdaSchedule(kind="fixed", target=target)
    )


def test_alignment_gradient_is_that_of_lambda_times_l_align(parallel):
    """With no output gradient, R receives exactly ∂(λ·L_align)/∂R, L_align computed by
    moealign's routing_alignment_loss from the layer's own logits ([B, S] task ids)."""
    torch.manual_seed(5)
    layer = megatron_moe_layer(tiny_config(), mpi_router())
    recorder = RoutingRecorder(layer, alignment=_alignment(), task_names=("a", "b", "c"))
    x = torch.randn(6, 4, D_MODEL)  # [S, B, D]
    task_ids_BS = torch.tensor([0, 1, 2, -1])[:, None].expand(4, 6)
    recorder.begin_micro_batch(step=3, task_ids=task_ids_BS)
    y, _ = layer(x)
    (0.0 * y).sum().backward()
    logits_TE = layer.router.gating(x).reshape(-1, N_EXPERTS)
    task_ids_T = task_ids_BS.T.reshape(-1)  # Megatron's token order: s-major
    prior = torch.full((1, N_EXPERTS), 1.0 / N_EXPERTS)
    expected = 0.3 * routing_alignment_loss([logits_TE.softmax(-1)], task_ids_T, prior)
    (grad,) = torch.autograd.grad(expected, layer.router.weight)
    torch.testing.assert_close(layer.router.weight.grad, grad)
    assert grad.abs().sum() > 0


def test_statistics_reach_megatron_tracker(parallel):
    """end_step writes moealign's statistics per layer to Megatron's tracker; the values equal
    the diagnostics of the routing map and logits that the router returned."""
    torch.manual_seed(6)
    layer = megatron_moe_layer(tiny_config(), mpi_router())
    recorder = RoutingRecorder(layer)
    clear_aux_losses_tracker()
    x = torch.randn(8, 2, D_MODEL)
    recorder.begin_micro_batch(step=0)
    layer(x)
    summary = recorder.end_step()
    with torch.no_grad():
        logits_TE = layer.router.gating(x).reshape(-1, N_EXPERTS)
        _, routing_map = layer.router(x)
    counts_E = routing_map.sum(0).double()
    assert counts_E.sum() == 16 * TOP_K
    tracker = get_moe_layer_wise_logging_tracker()
    expected = {
        "max_vio": diagnostics.max_violation(counts_E),
        "usage_entropy": diagnostics.usage_entropy(counts_E),
        "dead_experts": diagnostics.dead_experts(counts_E).double(),
        "token_entropy": diagnostics.token_entropy(logits_TE.softmax(-1).double()),
        "projection_alignment": diagnostics.projection_alignment(
            layer.router.effective_weight(), drive_matrix(layer.experts, "gate")
        ).mean(),
        "projection_alignment_raw": diagnostics.projection_alignment(
            layer.router.weight, drive_matrix(layer.experts, "gate")
        ).mean(),
    }
    for name, value in expected.items():
        torch.testing.assert_close(
            tracker[name]["values"][0].double(), value.double(), rtol=1e-5, atol=1e-6
        )
    assert torch.equal(summary.expert_counts[0], counts_E)


def test_alignment_needs_task_ids(parallel):
    layer = megatron_moe_layer(tiny_config(), mpi_router())
    RoutingRecorder(layer, alignment=_alignment())
    with pytest.raises(ValueError, match="begin_micro_batch"):
        layer(torch.randn(2, 2, D_MODEL))


def test_guardrail_reads_the_summary_and_scales_the_term(parallel):
    """moealign's RoutingGuardrail reads end_step's summary (usage entropy under an unreachable
    floor: unhealthy) and halves λ: the next step's alignment gradient on R halves."""
    torch.manual_seed(7)
    layer = megatron_moe_layer(tiny_config(), mpi_router())
    alignment = _alignment()
    recorder = RoutingRecorder(layer, alignment=alignment, task_names=("a", "b"))
    guardrail = RoutingGuardrail(
        GuardrailConfig(
            policy="reduce_lambda", min_usage_entropy=1.0, patience=1, cooldown=0, factor=0.5
        ),
        N_EXPERTS,
        alignment,
    )
    x = torch.randn(4, 2, D_MODEL)
    task_ids_BS = torch.tensor([0, 1])[:, None].expand(2, 4)
    grads = []
    for step in range(2):
        layer.zero_grad()
        recorder.begin_micro_batch(step, task_ids_BS)
        y, _ = layer(x)
        (0.0 * y).sum().backward()
        grads.append(layer.router.weight.grad.clone())
        event = guardrail.check(step, recorder.end_step())
        assert event is not None and event["action"] == f"lambda scale -> {0.5 ** (step + 1):g}"
    torch.testing.assert_close(grads[1], 0.5 * grads[0])
