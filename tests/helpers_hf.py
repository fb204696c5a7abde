"""Tiny random transformers MoE models of every family moealign.integrations.hf supports,
shared by the Hugging Face tests."""

from __future__ import annotations

import torch
import transformers
from transformers import AutoModelForCausalLM

from moealign.integrations.hf import moe_blocks

VOCAB = 64
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=64,
    initializer_range=0.3,  # routers far from uniform, so routing mistakes show
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
FAMILY_CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(
        **COMMON, num_local_experts=4, num_experts_per_tok=2
    ),
    "olmoe": lambda: transformers.OlmoeConfig(
        **COMMON, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False
    ),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **COMMON,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
    ),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **COMMON,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        norm_topk_prob=True,
    ),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        **COMMON,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
    ),
}
FAMILIES = list(FAMILY_CONFIGS)
SOFTMAX_FAMILIES = [name for name in FAMILIES if name != "deepseek_v3"]


def tiny_model(family: str, seed: int = 0, **config_overrides):
    """A random model of ``family`` in eval mode; ``config_overrides`` replace config fields
    (e.g. ``vocab_size``)."""
    torch.manual_seed(seed)
    config = FAMILY_CONFIGS[family]()
    for name, value in config_overrides.items():
        setattr(config, name, value)
    model = AutoModelForCausalLM.from_config(config).eval()
    if family == "deepseek_v3":  # a non-zero selection bias, so the test sees it act
        for block in moe_blocks(model):
            block.mlp.gate.e_score_correction_bias.normal_(std=0.3)
    return model


def batch(seed: int = 1, shape: tuple[int, int] = (2, 7)) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def gate_inputs(model, input_ids) -> list[torch.Tensor]:
    """The hidden states each mlp.gate received (the test's own hooks)."""
    seen = []
    handles = [
        block.mlp.gate.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        for block in moe_blocks(model)
    ]
    with torch.no_grad():
        model(input_ids)
    for handle in handles:
        handle.remove()
    return seen


def save_with_tokenizer(model, directory) -> None:
    """Save ``model`` with a word-level tokenizer over the words w0..w49 (ids 1..50)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0} | {f"w{i}": i + 1 for i in range(50)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(directory)
    model.save_pretrained(directory)
