"""MPI routing and routing alignment in a Megatron-Core ``GPTModel`` (docs/engines.md).

A tiny GPT built with Megatron's own classes (``GPTModel``, ``get_gpt_layer_local_spec``,
``MoELayer`` with ``SequentialMLP`` experts and the ``allgather`` dispatcher) whose MoE layers
use moealign's MPI router (``mpi_router``), trained on three synthetic tasks with moealign's
routing alignment term (warm-up λ schedule, uniform prior) attached through Megatron's aux-loss
path and moealign's routing statistics written to Megatron's MoE metrics tracker. One process,
a gloo group, the CPU (the layers' self-attention is ``IdentityOp``: see :func:`build_model`).
Appends to ``--out``/``metrics.jsonl`` one record per step (the LM loss, λ, and
``track_moe_metrics``' values); ``--save-at N`` also saves a Megatron checkpoint (``torch``
format) after step N, and ``--resume`` continues from it, appending the steps after N.

    PYTHONPATH=src python3 examples/megatron_mpi.py --steps 60 --out runs/megatron_mpi
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, track_moe_metrics
from megatron.core.transformer.transformer_config import TransformerConfig

from moealign.alignment.term import RoutingAlignment, RoutingPrior
from moealign.distributed.context import free_port
from moealign.engines.megatron import RoutingRecorder, bind_experts, mpi_router
from moealign.optim.schedules import LambdaSchedule

VOCAB, SEQ, BATCH, LAYERS, EXPERTS = 64, 16, 12, 2, 4
TASKS = ("count", "repeat", "alternate")


def build_model(seed: int = 0) -> GPTModel:
    """A 2-layer ``GPTModel`` whose MLPs are MoE layers with the MPI router.

    The layers' self-attention is ``IdentityOp`` (each layer: RMSNorm → MoE → residual):
    Megatron 0.16.1's ``DotProductAttention`` needs CUDA (its matmul buffer on
    ``torch.cuda.current_device()``, the CUDA RNG tracker's fork around attention dropout, the
    default causal mask on "cuda"). On a GPU keep the spec's attention as it is."""
    config = TransformerConfig(
        num_layers=LAYERS,
        hidden_size=32,
        num_attention_heads=4,
        ffn_hidden_size=32,
        moe_ffn_hidden_size=32,
        num_moe_experts=EXPERTS,
        moe_router_topk=2,
        moe_token_dispatcher_type="allgather",
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=1e-2,
        moe_z_loss_coeff=1e-3,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
    )
    spec = get_gpt_layer_local_spec(num_experts=EXPERTS, normalization="RMSNorm")
    spec.submodules.input_layernorm = IdentityOp
    spec.submodules.self_attention = IdentityOp
    spec.submodules.self_attn_bda = IdentityFuncOp
    spec.submodules.mlp.submodules.router = mpi_router(c_prime=4.0, power_steps=1)
    torch.manual_seed(seed)
    model = GPTModel(
        config,
        spec,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="learned_absolute",
    )
    bind_experts(model)
    return model


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [B, S] and task ids [B, S]: each row is one task's sequence (``count``: a run
    a, a+1, …; ``repeat``: one token; ``alternate``: two tokens in turn), from a seed per step."""
    generator = torch.Generator().manual_seed(1000 + step)
    task_B = torch.arange(BATCH) % len(TASKS)
    start_B = torch.randint(0, VOCAB, (BATCH,), generator=generator)
    other_B = torch.randint(0, VOCAB, (BATCH,), generator=generator)
    position_S = torch.arange(SEQ)
    count = (start_B[:, None] + position_S) % VOCAB
    repeat = start_B[:, None].expand(BATCH, SEQ)
    alternate = torch.where(position_S % 2 == 0, start_B[:, None], other_B[:, None])
    tokens = torch.where(
        task_B[:, None] == 0, count, torch.where(task_B[:, None] == 1, repeat, alternate)
    )
    return tokens, task_B[:, None].expand(BATCH, SEQ).clone()


def lm_loss(model: GPTModel, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy from Megatron's own per-token loss."""
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    position_ids = torch.arange(inputs.shape[1]).expand_as(inputs)
    # True = masked; passed explicitly (Megatron's default causal mask is built on "cuda")
    causal_mask = torch.ones(inputs.shape[1], inputs.shape[1]).triu(1).bool()[None, None]
    return model(inputs, position_ids, attention_mask=causal_mask, labels=labels).mean()


def save(model, optimizer, recorder, directory: Path) -> None:
    """Megatron's ``torch`` checkpoint format (``state_dict_for_save_checkpoint``, as
    Megatron-LM's ``--ckpt-format torch``) with the optimizer and the alignment state (its
    prior and guardrail handles). Megatron 0.16.1's ``dist_checkpointing`` (``torch_dist``)
    calls ``torch.cuda.synchronize`` while saving, so it does not run on the CPU."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict_for_save_checkpoint(),
        "optimizer": optimizer.state_dict(),
        "alignment": recorder.alignment.state_dict(),
    }
    torch.save(state, directory / "model_optim_rng.pt")


def load(model, optimizer, recorder, directory: Path) -> None:
    state = torch.load(directory / "model_optim_rng.pt", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    recorder.alignment.load_state_dict(state["alignment"])


def train(steps: int, out: Path, *, save_at: int | None = None, resume: bool = False) -> list[dict]:
    """Train ``steps`` steps (from the checkpoint of ``--save-at`` when ``resume``) and return
    the per-step records (also appended to ``out/metrics.jsonl``)."""
    model = build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    alignment = RoutingAlignment(
        RoutingPrior("uniform", LAYERS, EXPERTS),
        LambdaSchedule(kind="warmup", target=0.1, warmup_steps=10),
    )
    recorder = RoutingRecorder(model, alignment=alignment, task_names=TASKS)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))  # one micro-batch per step
    first = 0
    if resume:
        checkpoint = out / "checkpoint"
        first = json.loads((checkpoint / "step.json").read_text())["step"]
        load(model, optimizer, recorder, checkpoint)
    records = []
    for step in range(first, steps):
        tokens, task_ids = batch(step)
        recorder.begin_micro_batch(step, task_ids[:, :-1])
        loss = lm_loss(model, tokens)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        recorder.end_step()
        tracked: dict[str, torch.Tensor] = {}
        track_moe_metrics(
            loss_scale=1.0, iteration=step, total_loss_dict=tracked, num_layers=LAYERS
        )
        record = {"step": step, "loss": loss.item(), "lambda": alignment.weight(step)}
        record |= {name: float(value) for name, value in tracked.items()}
        records.append(record)
        if save_at is not None and step + 1 == save_at:
            save(model, optimizer, recorder, out / "checkpoint")
            (out / "checkpoint" / "step.json").write_text(json.dumps({"step": save_at}))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metrics.jsonl", "a") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--save-at", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    records = train(args.steps, args.out, save_at=args.save_at, resume=args.resume)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    last = records[-1]
    print(
        f"steps {records[0]['step']}..{last['step']}: loss {records[0]['loss']:.3f} -> "
        f"{last['loss']:.3f}, projection_alignment {last['projection_alignment']:.3f}, "
        f"max_vio {last['max_vio']:.3f}; records in {args.out / 'metrics.jsonl'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
