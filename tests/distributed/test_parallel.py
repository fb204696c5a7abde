"""DDP, FSDP2 and expert parallelism on 2 gloo CPU ranks against one process (DESIGN.md §9).

One spawn of 2 ranks runs every case; the single-process references run here. A distributed
run on a global batch of 8 sequences must give, step by step, the losses, routing statistics
and (whole, clipped) gradients of one process that accumulates the same 2 micro-batches, for
the softmax top-k and MPI routers, with the aux-loss-free bias and the marginal alignment prior
(both reduced over ranks). Checkpoints move between world sizes (2 → 1 with FSDP2, 1 → 2 with
expert parallelism), and the all-to-all dispatch copes with experts (and a whole rank) that
receive no token. A second spawn of 4 ranks runs expert parallelism on a (dp = 2, ep = 2) mesh
against one process accumulating 4 micro-batches: expert gradients are then reduced over an
expert's 2 data-parallel replicas and the clipping norm over an ep group, which 2 ranks
(dp = 1) cannot tell apart from the whole world.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers_train import TINY
from moealign.config import ConfigError, load_config
from moealign.distributed.context import free_port, set_local_rank_environment
from moealign.distributed.parallel import ExpertParallelExperts
from moealign.nn.experts import SwiGLUExperts
from moealign.nn.moe import MoELayer
from moealign.training.trainer import Trainer

OVERRIDES = [
    *TINY,
    "data.tasks=['copy', 'reverse', 'sort']",
    "alignment.schedule=fixed",
    "alignment.lambda_target=0.1",
    "alignment.prior=marginal",
    "alignment.prior_decay=0.5",
    "train.steps=3",
    "train.eval_batches=1",
    "train.checkpoint_every=0",
    "train.task_eval_examples=0",
    "train.device=cpu",
    "optim.warmup_steps=1",
]
ROUTERS = {
    "softmax_topk": "model.router_options={expert_bias = true}",
    "mpi": "model.router_options={expert_bias = true, c_prime = 2.0}",
}
CASES = [(mode, router) for mode in ("ddp", "fsdp", "ep") for router in ROUTERS]
# Activation checkpointing under each layout: the recomputation runs inside FSDP2's backward of
# a block and repeats expert parallelism's all-to-alls; the same numbers as without it.
CHECKPOINTED = [("ddp", "softmax_topk", "full"), ("fsdp", "mpi", "full"), ("ep", "mpi", "moe")]
# The global balance scope all-reduces expert counts inside the forward, which "full" repeats
# in the backward pass, between DDP's own gradient all-reduces.
GLOBAL_SCOPE = "model.balance_scope=global"
STEPS = 3
METRICS = ("loss", "lm_loss", "balance_loss", "z_loss", "align_loss", "grad_norm")


def _config(out_dir: str, name: str, router: str, parallel: str = "ddp", *extra: str):
    ep = ["train.ep_size=2"] if parallel == "ep" else []
    return load_config(
        None,
        [
            *OVERRIDES,
            f"model.router={router}",
            ROUTERS[router],
            f"train.parallel={parallel}",
            *ep,
            f"out_dir={out_dir}",
            f"name={name}",
            *extra,
        ],
    )


def _record_steps(trainer: Trainer) -> dict:
    """Per step: the metrics and every parameter's whole gradient; then the whole weights."""
    steps = []
    for _ in range(STEPS):
        metrics = trainer.train_step(next(trainer.data.train))
        steps.append(
            {
                "metrics": {k: v for k, v in metrics.items() if k in METRICS or "routing/" in k},
                "grads": trainer.parallel.full_gradients(trainer.model),
            }
        )
    return {
        "steps": steps,
        "weights": trainer.parallel.full_model_state(trainer.model),
        "prior": trainer.alignment.prior.value_LE.clone(),
    }


def _empty_expert_dispatch() -> dict:
    """All slots of both ranks go to experts 0 and 1 (rank 0's): rank 1 receives nothing and
    experts 2, 3 no token. Returns EP's and the unsharded layer's outputs and gradients."""
    torch.manual_seed(0)
    full = SwiGLUExperts(4, 8, 8, implementation="loop")
    sharded = ExpertParallelExperts(full, dist.group.WORLD)
    torch.manual_seed(1 + dist.get_rank())
    x_TD = torch.randn(5, 8, requires_grad=True)
    topk_idx_TK = torch.randint(0, 2, (5, 2))
    weight_TK = torch.rand(5, 2)
    target_TD = torch.randn(5, 8)
    results = {}
    for name, module in (("ep", sharded), ("full", full)):
        x_TD.grad = None
        y_TD = module(x_TD, topk_idx_TK, weight_TK)
        (y_TD * target_TD).sum().backward()
        grads = torch.cat([p.grad.flatten() for p in module.parameters()])
        results[name] = (y_TD.detach(), x_TD.grad.clone(), grads)
    # The unsharded layer's expert gradient, summed over the ranks' tokens, sliced as EP holds it.
    dist.all_reduce(results["full"][2])
    full_grads = dict(
        zip(("w_gate", "w_up", "w_down"), results["full"][2].split(4 * 8 * 8), strict=True)
    )
    mine = slice(2 * dist.get_rank(), 2 * dist.get_rank() + 2)
    expected = torch.cat([full_grads[n].view(4, 8, 8)[mine].flatten() for n in full_grads])
    return {
        "y": (results["ep"][0], results["full"][0]),
        "x_grad": (results["ep"][1], results["full"][1]),
        "expert_grad": (results["ep"][2], expected),
    }


def _start_rank(rank: int, world_size: int, port: int) -> None:
    """Join a gloo group of ``world_size`` spawned ranks, one thread each (they share 2 cores)."""
    set_local_rank_environment(rank, world_size, port)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)


def _finish_rank(results: dict, out_dir: str) -> None:
    torch.save(results, os.path.join(out_dir, f"rank{dist.get_rank()}.pt"))
    dist.destroy_process_group()


def _spawn(rank_main, world_size: int, out) -> list[dict]:
    """Run ``rank_main(rank, world_size, port, out_dir)`` on ``world_size`` ranks; their
    results, by rank."""
    mp.spawn(rank_main, args=(world_size, free_port(), str(out)), nprocs=world_size, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def _single_process_references(out, grad_accum: int) -> dict:
    """Per router: one process accumulating ``grad_accum`` micro-batches of the global batch."""
    return {
        router: _record_steps(
            Trainer(
                _config(
                    str(out),
                    f"single{grad_accum}-{router}",
                    router,
                    "ddp",
                    f"train.grad_accum={grad_accum}",
                )
            )
        )
        for router in ROUTERS
    }


def _rank_main(rank: int, world_size: int, port: int, out_dir: str) -> None:
    _start_rank(rank, world_size, port)
    results: dict = {
        (mode, router): _record_steps(
            Trainer(_config(out_dir, f"{mode}-{router}", router, mode), progress=False)
        )
        for mode, router in CASES
    }
    for mode, router, checkpointing in CHECKPOINTED:
        ac = f"train.activation_checkpointing={checkpointing}"
        trainer = Trainer(_config(out_dir, f"{mode}-{router}-ac", router, mode, ac), progress=False)
        results[(mode, router, checkpointing)] = _record_steps(trainer)
    for ac in ("none", "full"):
        overrides = (GLOBAL_SCOPE, f"train.activation_checkpointing={ac}")
        trainer = Trainer(
            _config(out_dir, f"global-{ac}", "softmax_topk", "ddp", *overrides), progress=False
        )
        results[("global", ac)] = _record_steps(trainer)
    Trainer(_config(out_dir, "two-to-one", "mpi", "fsdp"), progress=False).train(stop_at=2)
    resumed = Trainer(
        _config(out_dir, "one-to-two", "softmax_topk", "ep"), resume=True, progress=False
    )
    resumed.train()
    results["one-to-two"] = resumed.parallel.full_model_state(resumed.model)
    # A validation batch of one row: rank 1 has none but must join the sharded forward.
    one_row = {k: v[:1] for k, v in resumed.data.validation[0].items()}
    resumed.data.validation = [one_row]
    whole = resumed.whole_model()
    expected = None
    if whole is not None:
        with torch.no_grad():
            logits = whole.eval()(one_row["input_ids"]).logits
        expected = float(torch.nn.functional.cross_entropy(logits[0], one_row["labels"][0]))
    results["one-row-eval"] = (resumed.evaluate()["val_loss"], expected)
    results["dispatch"] = _empty_expert_dispatch()
    _finish_rank(results, out_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel")
    single_stop = _config(str(out), "one-to-two", "softmax_topk", "ep", "train.grad_accum=2")
    Trainer(single_stop, progress=False).train(stop_at=2)
    ranks = _spawn(_rank_main, 2, out)
    references = _single_process_references(out, grad_accum=2)
    resumed = Trainer(
        _config(str(out), "two-to-one", "mpi", "fsdp", "train.grad_accum=2"), resume=True
    )
    resumed.train()
    return {"references": references, "ranks": ranks, "two-to-one": resumed.model.state_dict()}


def _assert_state_close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=1e-4, atol=1e-5, msg=name)


def _assert_run_matches(run: dict, reference: dict) -> None:
    """Step by step: metrics and whole clipped gradients; then weights (expert biases included)
    and the marginal alignment prior."""
    for step, (got, want) in enumerate(zip(run["steps"], reference["steps"], strict=True)):
        assert got["metrics"].keys() == want["metrics"].keys()
        for key, value in want["metrics"].items():
            assert got["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (step, key)
        _assert_state_close(got["grads"], want["grads"])
    _assert_state_close(run["weights"], reference["weights"])
    # The prior is float64 but an EMA of fp32 routing probabilities that each rank sums over
    # its own micro-batch (other GEMM shapes, other reduction order): fp32 rounding, not fp64.
    torch.testing.assert_close(run["prior"], reference["prior"], rtol=1e-5, atol=1e-6)


def _assert_reference_exercises_statistics(reference: dict) -> None:
    """The reference moved the expert biases and the prior, and its experts are unbalanced, so
    matching it checks the reductions over ranks."""
    biases = [k for k in reference["weights"] if k.endswith("expert_bias")]
    assert biases and all(reference["weights"][k].abs().sum() > 0 for k in biases)
    assert not torch.allclose(reference["prior"], torch.full_like(reference["prior"], 0.25))
    # Routing statistics over all ranks: MaxVio of the global counts, not a rank's own.
    assert reference["steps"][0]["metrics"]["routing/max_vio"] > 0


@pytest.mark.parametrize(("mode", "router"), CASES)
def test_two_ranks_match_one_process_step_by_step(runs, mode, router):
    reference = runs["references"][router]
    for rank_results in runs["ranks"]:
        _assert_run_matches(rank_results[(mode, router)], reference)
    _assert_reference_exercises_statistics(reference)


@pytest.mark.parametrize(("mode", "router", "checkpointing"), CHECKPOINTED)
def test_activation_checkpointing_on_two_ranks_matches_one_process(
    runs, mode, router, checkpointing
):
    for rank_results in runs["ranks"]:
        _assert_run_matches(rank_results[(mode, router, checkpointing)], runs["references"][router])


def test_recomputed_global_balance_scope_matches_the_plain_one_on_two_ranks(runs):
    for rank_results in runs["ranks"]:
        plain, recomputed = rank_results[("global", "none")], rank_results[("global", "full")]
        assert plain["steps"][0]["metrics"]["balance_loss"] > 0
        _assert_run_matches(recomputed, plain)


def _rank_main_dp2_ep2(rank: int, world_size: int, port: int, out_dir: str) -> None:
    _start_rank(rank, world_size, port)
    results = {}
    for router in ROUTERS:
        trainer = Trainer(_config(out_dir, f"dp2-ep2-{router}", router, "ep"), progress=False)
        results[router] = _record_steps(trainer)
        results[router]["mesh"] = tuple(trainer.parallel.mesh.shape)
        results[router]["local_experts"] = {
            layer.experts.w_gate.shape[0]
            for layer in trainer.model.modules()
            if isinstance(layer, MoELayer)
        }
    _finish_rank(results, out_dir)


@pytest.fixture(scope="module")
def dp2_ep2_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel_dp2_ep2")
    return {
        "ranks": _spawn(_rank_main_dp2_ep2, 4, out),
        "references": _single_process_references(out, grad_accum=4),
    }


@pytest.mark.slow
@pytest.mark.parametrize("router", ROUTERS)
def test_four_expert_parallel_ranks_with_two_replicas_match_one_process(dp2_ep2_runs, router):
    """dp = 2 × ep = 2: expert gradients are reduced over an expert's 2 data-parallel replicas
    only, shared ones over all 4 ranks; every rank sees the one-process run's numbers."""
    reference = dp2_ep2_runs["references"][router]
    for rank_results in dp2_ep2_runs["ranks"]:
        run = rank_results[router]
        assert run["mesh"] == (2, 2)
        assert run["local_experts"] == {2}  # of n_experts = 4: the experts really are sharded
        _assert_run_matches(run, reference)
    _assert_reference_exercises_statistics(reference)


def test_checkpoint_written_by_two_fsdp_ranks_resumes_in_one_process(runs):
    _assert_state_close(runs["two-to-one"], runs["references"]["mpi"]["weights"])


def test_checkpoint_written_by_one_process_resumes_on_two_expert_parallel_ranks(runs):
    for rank_results in runs["ranks"]:
        _assert_state_close(
            rank_results["one-to-two"], runs["references"]["softmax_topk"]["weights"]
        )


def test_evaluation_with_a_rank_that_has_no_rows(runs):
    (loss_0, expected), (loss_1, _) = (r["one-row-eval"] for r in runs["ranks"])
    assert loss_0 == loss_1 == pytest.approx(expected, rel=1e-5)


def test_all_to_all_dispatch_with_experts_that_receive_no_tokens(runs):
    for rank, rank_results in enumerate(runs["ranks"]):
        for name, (got, want) in rank_results["dispatch"].items():
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{name} rank {rank}")
    # Rank 1's experts (2, 3) got no token: their gradient is exactly zero.
    assert torch.count_nonzero(runs["ranks"][1]["dispatch"]["expert_grad"][0]) == 0
    assert torch.count_nonzero(runs["ranks"][0]["dispatch"]["expert_grad"][0]) > 0


def test_parallel_settings_are_validated():
    with pytest.raises(ConfigError, match="optim.name"):
        _config("/tmp", "x", "mpi", "fsdp", "optim.name=muon")
    with pytest.raises(ConfigError, match="train.ep_size"):
        load_config(None, [*OVERRIDES, "train.parallel=ep", "train.ep_size=3"])
    with pytest.raises(ConfigError, match="ep_size"):
        load_config(None, [*OVERRIDES, "train.ep_size=2"])
    with pytest.raises(ConfigError, match="train.parallel"):
        load_config(None, [*OVERRIDES, "train.parallel=tp"])
