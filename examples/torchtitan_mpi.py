"""Train a tiny torchtitan Qwen3 MoE with moealign's MPI router and routing alignment on CPU.

Everything but the three moealign pieces is torchtitan's own: the model classes (``Qwen3Model``,
``MoE``, ``TokenChoiceTopKRouter``, ``GroupedExperts``), the cross-entropy loss, the optimizer
and learning-rate containers, the DCP ``CheckpointManager`` and the TensorBoard metrics logger.
moealign adds the MPI router (:func:`mpi_moe_config`), the routing alignment term
(:class:`AlignmentTerm`) and the routing statistics (:func:`routing_metrics`). The data are
three synthetic "tasks" (token sequences counting up in steps of 1, 3 or 5), with the task id of
every token in the batch. With ``--export-hf DIR`` the last checkpoint is written as a Hugging
Face Qwen3-MoE folder (:func:`export`), which ``moealign analyze`` reads. docs/engines.md
"torchtitan" runs this file; tests/engines runs :func:`train` and :func:`export`.

    python examples/torchtitan_mpi.py --out runs/torchtitan_mpi --steps 60
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torchtitan.components.checkpointer import CheckpointManager
from torchtitan.components.loss import cross_entropy_loss
from torchtitan.components.metrics import TensorBoardLogger
from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.components.optimizer.lr_scheduler import LRSchedulersContainer
from torchtitan.components.optimizer.optimizer import ParamGroupConfig
from torchtitan.models.common import CosSinRoPE, Embedding, Linear
from torchtitan.models.common.attention import ScaledDotProductAttention
from torchtitan.models.common.config_utils import make_gqa_config
from torchtitan.models.common.nn_modules import RMSNorm
from torchtitan.models.qwen3 import Qwen3Model
from torchtitan.models.qwen3.model import Qwen3TransformerBlock

from moealign.alignment.term import RoutingAlignment, RoutingPrior
from moealign.distributed.context import free_port
from moealign.engines.torchtitan import (
    AlignmentTerm,
    RoutingRecorder,
    export_hf,
    mpi_moe_config,
    router_grad_norms,
    routing_metrics,
    routing_summary,
    softmax_moe_config,
)
from moealign.evaluation.routing_stats import RoutingStats
from moealign.io import append_jsonl
from moealign.optim.schedules import LambdaSchedule

VOCAB, DIM, LAYERS, EXPERTS, TOP_K, HIDDEN, HEADS = 64, 32, 2, 8, 2, 32, 4
BATCH, SEQ_LEN, TASK_STEPS = 8, 16, (1, 3, 5)
TASKS = tuple(f"count_by_{step}" for step in TASK_STEPS)
INIT = {"weight": partial(nn.init.normal_, std=0.02), "bias": nn.init.zeros_}


def tiny_qwen3_moe(mpi_options: dict | None = None) -> Qwen3Model.Config:
    """A 2-layer torchtitan Qwen3 MoE (8 experts, top-2, softmax scores renormalised over the
    top-2, causal SDPA attention); with ``mpi_options`` (a dict, possibly empty) every MoE
    layer gets the MPI router."""

    def norm(width: int) -> RMSNorm.Config:
        return RMSNorm.Config(
            normalized_shape=width, eps=1e-6, param_init={"weight": nn.init.ones_}
        )

    def moe():
        config = softmax_moe_config(DIM, HIDDEN, EXPERTS, TOP_K, param_init=INIT["weight"])
        return config if mpi_options is None else mpi_moe_config(config, **mpi_options)

    head_dim = DIM // HEADS
    layers = [
        Qwen3TransformerBlock.Config(
            attention_norm=norm(DIM),
            ffn_norm=norm(DIM),
            attention=make_gqa_config(
                dim=DIM,
                n_heads=HEADS,
                head_dim=head_dim,
                wqkv_param_init=INIT,
                wo_param_init=INIT,
                inner_attention=ScaledDotProductAttention.Config(),  # causal; runs on CPU
                fuse_qkv=True,
                rope=CosSinRoPE.Config(dim=head_dim, max_seq_len=SEQ_LEN, theta=10000.0),
                qk_norm=norm(head_dim),
            ),
            moe=moe(),
        )
        for _ in range(LAYERS)
    ]
    return Qwen3Model.Config(
        vocab_size=VOCAB,
        dim=DIM,
        norm=norm(DIM),
        tok_embeddings=Embedding.Config(
            num_embeddings=VOCAB, embedding_dim=DIM, param_init={"weight": INIT["weight"]}
        ),
        lm_head=Linear.Config(in_features=DIM, out_features=VOCAB, param_init=INIT),
        layers=layers,
    )


def task_batch(step: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch ``step`` (a function of the step alone, so a resumed run sees the same data):
    (inputs_BL, labels_BL, task_ids_BL); sequence b counts up by TASK_STEPS[task_b] mod VOCAB."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    task_B = torch.randint(len(TASK_STEPS), (BATCH,), generator=generator)
    start_B = torch.randint(VOCAB, (BATCH,), generator=generator)
    stride_B = torch.tensor(TASK_STEPS)[task_B]
    tokens = (start_B[:, None] + stride_B[:, None] * torch.arange(SEQ_LEN + 1)) % VOCAB
    return tokens[:, :-1], tokens[:, 1:], task_B[:, None].expand(BATCH, SEQ_LEN)


def ensure_process_group() -> bool:
    """torchtitan's checkpointer asks for a process group: start one gloo rank when none runs
    (returns True when it did, so the caller ends it)."""
    if dist.is_initialized():
        return False
    address = f"tcp://127.0.0.1:{free_port()}"
    dist.init_process_group("gloo", init_method=address, rank=0, world_size=1)
    return True


def train(
    out_dir: str | Path,
    steps: int,
    *,
    mpi_options: dict | None = None,
    lambda_target: float = 0.1,
    checkpoint_every: int = 0,
    seed: int = 0,
) -> list[dict[str, float]]:
    """Train (resuming from the last checkpoint in ``out_dir``/checkpoint, if any) up to
    ``steps``; return the metrics of the steps run (also written to TensorBoard by
    torchtitan's logger under ``out_dir``/tb)."""
    own_group = ensure_process_group()
    mpi_options = {"c_prime": 4.0} if mpi_options is None else mpi_options
    torch.manual_seed(seed)
    model = tiny_qwen3_moe(mpi_options).build()
    model.init_states()
    optimizers = OptimizersContainer.Config(
        param_groups=[
            ParamGroupConfig(pattern=".*", optimizer_name="AdamW", optimizer_kwargs={"lr": 3e-3})
        ],
        implementation="for-loop",
    ).build(model_parts=[model])
    schedulers = LRSchedulersContainer.Config(warmup_steps=5).build(
        optimizers=optimizers, training_steps=steps
    )
    recorder = RoutingRecorder(model)
    term = AlignmentTerm(
        recorder,
        RoutingAlignment(
            RoutingPrior("marginal", LAYERS, EXPERTS, decay=0.9),
            LambdaSchedule(kind="warmup", target=lambda_target, warmup_steps=10),
        ),
    )
    train_state = TrainState()
    checkpointer = CheckpointManager.Config(
        enable=checkpoint_every > 0,
        folder="checkpoint",
        interval=max(checkpoint_every, 1),
        last_save_model_only=False,  # every checkpoint resumes training
    ).build(
        dataloader=None,
        model_parts=[model],
        optimizers=optimizers,
        lr_schedulers=schedulers,
        states={"train_state": train_state, "moealign_alignment": term},
        sd_adapter=None,
        base_folder=str(out_dir),
    )
    checkpointer.load()
    logger = TensorBoardLogger(str(Path(out_dir) / "tb"))
    history = []
    while train_state.step < steps:
        step = train_state.step
        inputs, labels, task_ids = task_batch(step, seed)
        if step == 0:  # the statistics (λ′ above all) before any update
            history.append(_initial(logger, model, recorder, inputs, task_ids))
        logits = model(inputs)
        lm_loss = cross_entropy_loss(logits, labels) / labels.numel()
        align_loss = term(task_ids, step)
        (lm_loss + align_loss).backward()
        router_norms = router_grad_norms(model)
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        stats = RoutingStats(LAYERS, EXPERTS, task_names=TASKS)
        stats.add(recorder.routing, task_ids)
        optimizers.step()
        schedulers.step()
        optimizers.zero_grad()
        term.end_step(step)
        train_state.step = step + 1
        lm_value, align_value = float(lm_loss.detach()), float(align_loss.detach())
        losses = {"loss": lm_value + align_value, "lm_loss": lm_value, "align_loss": align_value}
        losses["grad_norm"] = float(grad_norm)
        losses |= {f"moealign/{k}": v for k, v in term.metrics().items()}
        summary = routing_summary(stats, model, grad_norms=router_norms)
        history.append(_publish(logger, summary, train_state.step, losses))
        checkpointer.save(train_state.step, last_step=train_state.step == steps)
    recorder.remove()
    logger.close()
    checkpointer.close()
    if own_group:
        dist.destroy_process_group()
    return history


def _initial(logger, model, recorder, inputs, task_ids) -> dict:
    """Step 0's routing statistics, before any update (a forward without gradients)."""
    with torch.no_grad():
        model(inputs)
    stats = RoutingStats(LAYERS, EXPERTS, task_names=TASKS)
    stats.add(recorder.routing, task_ids)
    return _publish(logger, routing_summary(stats, model), 0, {})


def _publish(logger: TensorBoardLogger, summary, step: int, losses: dict) -> dict:
    metrics = {"step": step, **losses, **routing_metrics(summary)}
    logger.log(metrics, step)
    return metrics


class TrainState:
    """The step counter, saved with torchtitan's checkpoint (a ``Stateful``)."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def export(out_dir: str | Path, hf_dir: str | Path, mpi_options: dict | None = None) -> Path:
    """The last checkpoint of ``out_dir`` as a Hugging Face Qwen3-MoE folder ``hf_dir``
    (:func:`moealign.engines.torchtitan.export_hf`: the MPI gates as R_eff), with a word-level
    tokenizer whose word ``t{i}`` is token id i and ``tasks.jsonl``: the sequences of batch 0,
    one document each, written as those words (data for ``moealign analyze``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    steps = sorted(Path(out_dir, "checkpoint").glob("step-*"), key=lambda p: int(p.name[5:]))
    if not steps:
        raise ValueError(f"{out_dir}/checkpoint holds no step-N folder: train first")
    mpi_options = {"c_prime": 4.0} if mpi_options is None else mpi_options
    hf_dir = export_hf(tiny_qwen3_moe(mpi_options).build(), hf_dir, checkpoint=steps[-1])
    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t0").save_pretrained(hf_dir)
    inputs, _, _ = task_batch(0)
    (hf_dir / "tasks.jsonl").unlink(missing_ok=True)
    for row in inputs:
        append_jsonl(hf_dir / "tasks.jsonl", {"text": " ".join(f"t{int(i)}" for i in row)})
    return hf_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="run folder (checkpoints, TensorBoard)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--checkpoint-every", type=int, default=20)
    parser.add_argument("--export-hf", metavar="DIR", help="write the last checkpoint as HF")
    args = parser.parse_args()
    history = train(args.out, args.steps, checkpoint_every=args.checkpoint_every)
    if args.export_hf:
        print(f"Hugging Face Qwen3-MoE folder: {export(args.out, args.export_hf)}")
    if not history:
        print(f"{args.out} already holds all {args.steps} steps")
        return
    keys = ("lm_loss", "moe/projection_alignment", "moe/max_vio", "moe/token_entropy")
    print(f"{'step':>5} " + " ".join(f"{key:>26}" for key in keys))
    every = max(1, len(history) // 6)
    for index, row in enumerate(history):
        if index % every == 0 or index == len(history) - 1:
            cells = (f"{row[key]:>26.4f}" if key in row else f"{'-':>26}" for key in keys)
            print(f"{row['step']:>5} " + " ".join(cells))
    for row in history:  # a resumed run adds its steps to the file
        append_jsonl(Path(args.out) / "metrics.jsonl", row)


if __name__ == "__main__":
    main()
