"""Data parallel training: 2 CPU ranks with gloo give the losses, weights and expert biases of
one process that accumulates the same two micro-batches."""

from __future__ import annotations

import json
import os
import socket

import torch
import torch.multiprocessing as mp

from helpers_train import TINY
from moealign.config import load_config
from moealign.distributed.context import free_port, set_local_rank_environment
from moealign.io import read_jsonl
from moealign.training.trainer import Trainer

OVERRIDES = [
    *TINY,
    "data.tasks=['copy', 'reverse', 'sort']",
    "model.router_options={expert_bias = true}",
    "train.steps=3",
    "train.checkpoint_every=0",
    "train.task_eval_examples=50",
    "train.device=cpu",
    "optim.warmup_steps=1",
]


def _train(out_dir: str, name: str, grad_accum: int, *extra: str) -> Trainer:
    config = load_config(
        None,
        [*OVERRIDES, *extra, f"out_dir={out_dir}", f"name={name}"]
        + [f"train.grad_accum={grad_accum}"],
    )
    trainer = Trainer(config, progress=False)
    trainer.train()
    return trainer


def _rank_main(rank: int, world_size: int, port: int, out_dir: str, *extra: str) -> None:
    set_local_rank_environment(rank, world_size, port)
    torch.set_num_threads(1)
    trainer = _train(out_dir, "ddp", 1, *extra)
    state = {k: v.tolist() for k, v in trainer.model.state_dict().items()}
    with open(os.path.join(out_dir, f"state_rank{rank}.json"), "w") as handle:
        json.dump(state, handle)
    trainer.close()


def _assert_ranks_match(tmp_path, single: Trainer) -> None:
    """Both ranks' training records and final weights equal the one-process run's."""

    def losses(run: str) -> list[dict[str, float]]:
        records = read_jsonl(tmp_path / run / "metrics.jsonl")
        return [record for record in records if record.get("split") == "train"]

    ddp_records, single_records = losses("ddp"), losses(single.config.name)
    assert len(ddp_records) == len(single_records) == 3
    for ddp, one in zip(ddp_records, single_records, strict=True):
        for key in ("loss", "lm_loss", "balance_loss", "z_loss", "routing/max_vio"):
            assert abs(ddp[key] - one[key]) <= 1e-5 * max(1.0, abs(one[key])), (key, ddp, one)
    ranks = [json.loads((tmp_path / f"state_rank{r}.json").read_text()) for r in (0, 1)]
    for name, value in single.model.state_dict().items():
        for rank_state in ranks:
            torch.testing.assert_close(
                torch.tensor(rank_state[name], dtype=value.dtype), value, rtol=1e-4, atol=1e-5
            )


def test_two_gloo_ranks_match_one_process_with_the_same_global_batch(tmp_path):
    mp.spawn(_rank_main, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    single = _train(str(tmp_path), "single", grad_accum=2)
    _assert_ranks_match(tmp_path, single)
    expected = single.model.state_dict()
    biases = [k for k in expected if k.endswith("expert_bias")]
    assert biases and any(expected[k].abs().sum() > 0 for k in biases)
    assert json.loads((tmp_path / "ddp" / "final_eval.json").read_text())["step"] == 3


def test_global_balance_scope_on_two_ranks_is_the_whole_batch_loss_of_one_process(tmp_path):
    # f_e from the counts of both ranks, P_e from each rank's half: averaged over ranks (as DDP
    # averages gradients) this is E·Σ f_e P_e of the whole global batch (DESIGN.md §4).
    port = free_port()
    args = (2, port, str(tmp_path), "model.balance_scope=global", "loss.balance_coef=0.5")
    mp.spawn(_rank_main, args=args, nprocs=2, join=True)
    single = _train(str(tmp_path), "whole", 1, "model.balance_scope=batch", "loss.balance_coef=0.5")
    _assert_ranks_match(tmp_path, single)


def test_local_rank_environment_is_what_torchrun_sets_and_the_port_is_bindable(monkeypatch):
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    for name in names:
        monkeypatch.setenv(name, "unset")  # restored after the test
    port = free_port()
    set_local_rank_environment(1, 2, port)
    assert [os.environ[name] for name in names] == ["1", "1", "2", "127.0.0.1", str(port)]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
