"""Import and export between moealign and transformers checkpoints (safetensors only).

* :func:`export_pretrained` saves a model so ``AutoModelForCausalLM.from_pretrained`` loads it
  with identical logits: a :class:`MoETransformer` becomes a ``MixtralForCausalLM`` (softmax
  top-k routers; MPI routers as their precomputed R_eff, DESIGN.md §3), and a transformers
  model whose gates were swapped (:func:`~moealign.integrations.hf.swap_routers`) is saved as
  it is: a swapped gate's state dict is its native router's weight, the effective rows.
* :func:`import_pretrained` loads a Mixtral-architecture checkpoint into a
  :class:`MoETransformer`.
* :func:`export_run` (``moealign export RUN_DIR OUT``) turns a run directory's checkpoint into a
  complete model directory: weights, config and generation config with the tokenizer's
  BOS/EOS/PAD ids (greedy by default, stopping at EOS like moealign's decoding), and the
  tokenizer files, so that ``AutoModelForCausalLM``, ``AutoTokenizer`` and
  ``pipeline("text-generation")`` work on it as they do on any hub model.

Layouts. Experts: transformers ``gate_up_proj`` (E, 2F, D) = [w_gate; w_up] along F, and
``down_proj`` (E, D, F) = w_down. Attention: moealign's fused ``qkv`` rows are [q; k; v], and its
rotary embedding rotates interleaved feature pairs (2i, 2i+1) of each head by angle s·θ^(−2i/d),
while transformers' ``rotate_half`` pairs (i, i + d/2). Permuting each head's q and k rows by
[0, 2, 4, …, 1, 3, 5, …] maps one onto the other; attention scores q·k are unchanged because q
and k are permuted alike.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from torch import Tensor, nn

from moealign.config import RunConfig
from moealign.data.build import build_data_tokenizer
from moealign.integrations.hf import detect_family
from moealign.integrations.router_weights import linear_router_weight
from moealign.io import atomic_directory, naming_file
from moealign.nn.moe import MoELayer
from moealign.nn.routers import MPIRouter
from moealign.nn.transformer import ModelConfig, MoETransformer
from moealign.progress import phase
from moealign.training.checkpoint import (
    Checkpoint,
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    step_dir_name,
)
from moealign.training.preflight import check_writable_folder
from moealign.training.runs import CHECKPOINT_DIR, TOKENIZER_DIR, RunLock, read_run_config

# --- MoETransformer ↔ Mixtral -------------------------------------------------------------------


def rotary_permutation(head_dim: int) -> Tensor:
    """Index p with hf_rows = ours_rows[p] per head: interleaved pairs → rotate_half halves."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def _permute_heads(weight_OD: Tensor, n_heads: int, order: Tensor) -> Tensor:
    width = weight_OD.shape[-1]
    return weight_OD.view(n_heads, -1, width)[:, order].reshape(-1, width)


def _check_exportable(config: ModelConfig) -> None:
    problems = []
    if config.ffn != "moe":
        problems.append(f"ffn={config.ffn!r} (needs 'moe')")
    if config.moe_every != 1:
        problems.append(f"moe_every={config.moe_every} (Mixtral has MoE in every layer)")
    if config.shared_d_ff:
        problems.append(f"shared_d_ff={config.shared_d_ff} (Mixtral has no shared expert)")
    if config.merged_experts is not None:
        problems.append(
            f"merged_experts={config.merged_experts} (a merged model keeps {config.n_experts} "
            "router rows that share its experts, R2; Mixtral needs one router row per expert)"
        )
    if problems:
        raise ValueError(
            "this MoETransformer cannot be exported as Mixtral: " + "; ".join(problems)
        )


def mixtral_config(config: ModelConfig, special_ids: dict[str, int | None] | None = None):
    """The ``MixtralConfig`` of a :class:`MoETransformer`'s architecture; ``special_ids`` sets
    ``bos_token_id``/``eos_token_id``/``pad_token_id`` (default: none)."""
    from transformers import MixtralConfig

    ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    ids |= special_ids or {}

    return MixtralConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.expert_d_ff,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_heads,
        head_dim=config.d_model // config.n_heads,
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        num_local_experts=config.n_experts,
        num_experts_per_tok=config.top_k,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        initializer_range=config.init_std,
        **ids,
    )


def to_mixtral(model: MoETransformer, special_ids: dict[str, int | None] | None = None):
    """A ``MixtralForCausalLM`` (float32, eval mode) computing the same logits as ``model``
    (``special_ids``: see :func:`mixtral_config`)."""
    from transformers import MixtralForCausalLM

    config = model.config
    _check_exportable(config)
    order = rotary_permutation(config.d_model // config.n_heads)
    state = {
        "model.embed_tokens.weight": model.embed.weight,
        "model.norm.weight": model.norm.weight,
        "lm_head.weight": model.lm_head.weight,
    }
    width = config.d_model
    for index, block in enumerate(model.blocks):
        moe: MoELayer = block.ffn
        drive = moe.router_drive_matrix() if isinstance(moe.router, MPIRouter) else None
        q, k, v = block.attn.qkv.weight.split(width)
        prefix = f"model.layers.{index}."
        state |= {
            prefix + "input_layernorm.weight": block.attn_norm.weight,
            prefix + "post_attention_layernorm.weight": block.ffn_norm.weight,
            prefix + "self_attn.q_proj.weight": _permute_heads(q, config.n_heads, order),
            prefix + "self_attn.k_proj.weight": _permute_heads(k, config.n_heads, order),
            prefix + "self_attn.v_proj.weight": v,
            prefix + "self_attn.o_proj.weight": block.attn.out.weight,
            prefix + "mlp.gate.weight": linear_router_weight(moe.router, drive, True),
            prefix + "mlp.experts.gate_up_proj": torch.cat(
                [moe.experts.w_gate, moe.experts.w_up], dim=1
            ),
            prefix + "mlp.experts.down_proj": moe.experts.w_down,
        }
    hf_model = MixtralForCausalLM(mixtral_config(config, special_ids))
    with torch.no_grad():
        hf_model.load_state_dict({k: v.detach().float().cpu() for k, v in state.items()})
    return hf_model.eval()


MIXTRAL_ONLY = (
    "olmoe: q/k RMSNorm; qwen2_moe: q/k/v biases and a gated shared expert; qwen3_moe: per-head "
    "q/k RMSNorm; deepseek_v3: latent attention and sigmoid group-limited routing"
)


def _check_importable(hf_model) -> None:
    family = detect_family(hf_model)
    if family.name != "mixtral":
        raise ValueError(
            f"model_type={family.name!r} cannot be imported into a MoETransformer: only "
            f"Mixtral-architecture checkpoints map onto it ({MIXTRAL_ONLY}). Use "
            "capture_routing, swap_routers and HFRouted on the transformers model instead."
        )
    config = hf_model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = config.rope_parameters or {}
    checks = (
        ("num_key_value_heads", config.num_key_value_heads, config.num_attention_heads),
        ("head_dim", head_dim, config.hidden_size // config.num_attention_heads),
        ("sliding_window", config.sliding_window, None),
        ("hidden_act", config.hidden_act, "silu"),
        ("rope_parameters.rope_type", rope.get("rope_type", "default"), "default"),
        ("router_jitter_noise", config.router_jitter_noise, 0.0),
    )
    for name, value, accepted in checks:
        if value != accepted:
            raise ValueError(
                f"config.{name}={value!r} is not accepted for import into a MoETransformer; "
                f"expected {accepted!r}"
            )


def from_mixtral(hf_model) -> MoETransformer:
    """A float32 :class:`MoETransformer` computing the same logits as a transformers Mixtral."""
    _check_importable(hf_model)
    hf = hf_model.config
    config = ModelConfig(
        vocab_size=hf.vocab_size,
        d_model=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads,
        max_seq_len=hf.max_position_embeddings,
        ffn="moe",
        n_experts=hf.num_local_experts,
        top_k=hf.num_experts_per_tok,
        expert_d_ff=hf.intermediate_size,
        router="softmax_topk",
        tie_embeddings=bool(hf.tie_word_embeddings),
        rope_theta=float(hf.rope_parameters["rope_theta"]),
        norm_eps=hf.rms_norm_eps,
        init_std=hf.initializer_range,
    )
    model = MoETransformer(config)
    source = {k: v.detach().float().cpu() for k, v in hf_model.state_dict().items()}
    inverse = torch.argsort(rotary_permutation(config.d_model // config.n_heads))
    with torch.no_grad():
        model.embed.weight.copy_(source["model.embed_tokens.weight"])
        model.norm.weight.copy_(source["model.norm.weight"])
        if not config.tie_embeddings:
            model.lm_head.weight.copy_(source["lm_head.weight"])
        for index, block in enumerate(model.blocks):
            prefix = f"model.layers.{index}."
            q = _permute_heads(source[prefix + "self_attn.q_proj.weight"], config.n_heads, inverse)
            k = _permute_heads(source[prefix + "self_attn.k_proj.weight"], config.n_heads, inverse)
            v = source[prefix + "self_attn.v_proj.weight"]
            block.attn.qkv.weight.copy_(torch.cat([q, k, v]))
            block.attn.out.weight.copy_(source[prefix + "self_attn.o_proj.weight"])
            block.attn_norm.weight.copy_(source[prefix + "input_layernorm.weight"])
            block.ffn_norm.weight.copy_(source[prefix + "post_attention_layernorm.weight"])
            block.ffn.router.weight.copy_(source[prefix + "mlp.gate.weight"])
            gate_up = source[prefix + "mlp.experts.gate_up_proj"]
            block.ffn.experts.w_gate.copy_(gate_up[:, : config.expert_d_ff])
            block.ffn.experts.w_up.copy_(gate_up[:, config.expert_d_ff :])
            block.ffn.experts.w_down.copy_(source[prefix + "mlp.experts.down_proj"])
    return model.eval()


# --- public entry points --------------------------------------------------------------------------


def export_pretrained(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save ``model`` as a transformers checkpoint (config.json + model.safetensors) in ``path``.

    A :class:`MoETransformer` is written as Mixtral; a supported transformers MoE model is
    written in its own family with native gates (swapped gates as their effective rows). Load
    it with ``AutoModelForCausalLM.from_pretrained(path)``.
    """
    path = Path(path)
    if isinstance(model, MoETransformer):
        to_mixtral(model).save_pretrained(path)
        return path
    detect_family(model)
    model.save_pretrained(path)  # swapped gates save their native weight (MoealignGate)
    return path


def _run_checkpoint(run_dir: Path, step: int | None, model: MoETransformer) -> Checkpoint:
    """Load the newest checkpoint whose weights fit ``model`` (or that of ``step``) into it."""
    directory = run_dir / CHECKPOINT_DIR
    if step is None:
        checkpoint = load_latest(directory, fallback=True, apply=lambda c: c.load_model(model))
        if checkpoint is None:
            raise CheckpointError(f"run directory {run_dir} holds no checkpoint to export")
        return checkpoint
    path = directory / step_dir_name(step) if 0 <= step < 10**9 else None
    if path is None or not path.is_dir():
        steps = [int(p.name.removeprefix("step_")) for p in list_checkpoints(directory)]
        raise CheckpointError(
            f"--step {step}: run directory {run_dir} has no checkpoint of that step; "
            f"its checkpoints are at steps {steps}"
        )
    checkpoint = load_checkpoint(path)
    try:
        checkpoint.load_model(model)
    except Exception as err:  # weights that do not fit the (edited) config.json
        raise CheckpointError(
            f"checkpoint {path} does not fit {run_dir / 'config.json'}: "
            f"{' '.join(str(err).split())[:300]}"
        ) from None
    return checkpoint


def _write_run_tokenizer(run_dir: Path, config: RunConfig, directory: Path):
    """Copy the run's saved tokenizer files (or, for a run from before they were saved, rebuild
    its tokenizer from the config) into ``directory``; returns them loaded by AutoTokenizer."""
    from transformers import AutoTokenizer

    saved = run_dir / TOKENIZER_DIR
    if saved.is_dir():
        shutil.copytree(saved, directory, dirs_exist_ok=True)
    else:
        build_data_tokenizer(config.data).save_pretrained(directory)
    with naming_file("the tokenizer", directory):
        return AutoTokenizer.from_pretrained(directory)


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, step: int | None = None) -> Path:
    """Export a run directory's checkpoint (the newest good one, or that of ``step``) as a
    complete Hugging Face model directory ``out``: ``model.safetensors`` and ``config.json``
    (Mixtral, :func:`to_mixtral`) with the tokenizer's BOS/EOS/PAD ids,
    ``generation_config.json`` (greedy, stopping at EOS or after ``model.max_seq_len`` new
    tokens unless a call gives its own ``max_new_tokens``; no ``max_length``, so that
    ``generate(ids, max_new_tokens=16)`` and the text-generation pipeline run without warnings)
    and the run's tokenizer files.

    ``out`` must not exist or be an empty directory; the export is written next to it and
    moved into place, so a failed export leaves nothing behind. Raises
    :class:`~moealign.training.checkpoint.CheckpointError` for a missing run, step or
    checkpoint and ``ValueError`` for a model Mixtral cannot express.
    """
    from transformers import GenerationConfig
    from transformers.utils import logging as transformers_logging

    run_dir, out = Path(run_dir), Path(out)
    check_writable_folder(out, "OUT", writes="export")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"OUT={str(out)!r} exists and is not an empty directory; choose another")
    config = read_run_config(run_dir)
    _check_exportable(config.model)
    transformers_logging.disable_progress_bar()  # progress is moealign.progress's alone
    # A shared lock: training (which rotates checkpoints) cannot run while the checkpoint is read.
    with RunLock(run_dir, shared=True):
        model = MoETransformer(config.model)
        _run_checkpoint(run_dir, step, model)  # a bad --step fails before any progress line
        with phase("export: convert and write"), atomic_directory(out) as tmp:
            tokenizer = _write_run_tokenizer(run_dir, config, tmp)
            ids = {
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
            }
            hf_model = to_mixtral(model, ids)
            # A budget of new tokens, never max_length: transformers warns "Both max_new_tokens
            # and max_length seem to have been set" on every call that passes its own budget.
            hf_model.generation_config = GenerationConfig(
                **ids, do_sample=False, max_new_tokens=config.model.max_seq_len
            )
            hf_model.save_pretrained(tmp)
    return out


def import_pretrained(source, **from_pretrained_options) -> MoETransformer:
    """A :class:`MoETransformer` from a Mixtral-architecture transformers model, or from a local
    directory / hub name loaded with ``AutoModelForCausalLM.from_pretrained(source,
    dtype=torch.float32, **from_pretrained_options)``."""
    if isinstance(source, (str, os.PathLike)):
        from transformers import AutoModelForCausalLM

        from moealign.integrations.locations import pretrained_location

        source = AutoModelForCausalLM.from_pretrained(
            pretrained_location(source, "source"), dtype=torch.float32, **from_pretrained_options
        )
    return from_mixtral(source)


__all__ = [
    "export_pretrained",
    "export_run",
    "from_mixtral",
    "import_pretrained",
    "mixtral_config",
    "rotary_permutation",
    "to_mixtral",
]
