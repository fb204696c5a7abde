"""A tiny trained run shared by the export and lm-evaluation-harness tests (one training per
session; seconds on a quiet CPU)."""

from __future__ import annotations

import pytest

from helpers_train import tiny_config
from moealign.training.trainer import Trainer

RUN_OVERRIDES = [
    "name=run",
    "data.tasks=['copy', 'addition']",
    "model.router=mpi",  # exported as its precomputed R_eff (DESIGN.md §3)
    "train.steps=40",
    "train.checkpoint_every=20",
    "train.task_eval_examples=0",
    "optim.lr=1e-2",
]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """The directory of a 40-step MPI run on the copy and addition tasks (checkpoints at steps
    20 and 40)."""
    config = tiny_config(tmp_path_factory.mktemp("runs"), *RUN_OVERRIDES)
    trainer = Trainer(config, progress=False)
    try:
        trainer.train()
    finally:
        trainer.close()
    return config.run_dir
