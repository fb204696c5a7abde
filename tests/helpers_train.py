"""A seconds-long training configuration shared by the trainer tests."""

from __future__ import annotations

from moealign.config import load_config

TINY = [
    "data.source=tasks",
    "data.examples_per_task=40",
    "data.tasks=['copy', 'reverse', 'sort', 'addition']",
    "data.heldout_tasks=[]",
    "data.heldout_compositions=[]",
    "model.n_layers=2",
    "model.d_model=32",
    "model.n_heads=2",
    "model.vocab_size=258",
    "model.max_seq_len=64",
    "model.n_experts=4",
    "model.expert_d_ff=32",
    "train.seq_len=48",
    "train.batch_size=8",
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_batches=2",
    "train.task_eval_examples=2",
    "optim.warmup_steps=2",
]


def tiny_config(tmp_path, *overrides: str):
    return load_config(None, [*TINY, f"out_dir={tmp_path}", *overrides])
