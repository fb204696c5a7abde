"""Decoder-only language model whose FFNs are dense SwiGLU or :class:`MoELayer` (DESIGN.md §1–2).

Pre-norm blocks: h = h + Attn(RMSNorm(h)); h = h + FFN(RMSNorm(h)), with rotary position
embeddings and causal attention through ``scaled_dot_product_attention``. A dense baseline of
matched *active* parameters is ``ModelConfig.dense_matched()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moealign.config import ModelConfig
from moealign.nn.checkpointing import checkpointed
from moealign.nn.moe import MoELayer, RoutingInfo, SwiGLU

FFN_KINDS = ("dense", "moe")


@dataclass
class TransformerOutput:
    logits: Tensor  # (B, S, V)
    routing: list[RoutingInfo]  # one per MoE layer, in depth order


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al. 2021): rotate each (even, odd) feature pair by angle s·θ^(−2i/d)."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x_BHSd: Tensor) -> Tensor:
        seq_len = x_BHSd.shape[-2]
        cos, sin = self.cos[:seq_len].to(x_BHSd.dtype), self.sin[:seq_len].to(x_BHSd.dtype)
        even, odd = x_BHSd[..., 0::2], x_BHSd[..., 1::2]
        return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.out = nn.Linear(config.d_model, config.d_model, bias=False)
        self.rotary = RotaryEmbedding(
            config.d_model // config.n_heads, config.max_seq_len, config.rope_theta
        )

    def forward(self, x_BSD: Tensor) -> Tensor:
        batch, seq_len, width = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(batch, seq_len, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(self.rotary(q), self.rotary(k), v, is_causal=True)
        return self.out(attended.transpose(1, 2).reshape(batch, seq_len, width))


class Block(nn.Module):
    """Pre-norm block h = h + Attn(RMSNorm(h)); h = h + FFN(RMSNorm(h)).

    ``activation_checkpointing`` ("none", "full" or "moe"; set by
    :func:`moealign.nn.checkpointing.apply_activation_checkpointing`) recomputes the whole block
    or only its MoE FFN in the backward pass.
    """

    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        self.activation_checkpointing = "none"
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ffn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        if config.is_moe_layer(index):
            self.ffn: nn.Module = MoELayer(
                config.d_model,
                config.expert_d_ff,
                config.n_experts,
                config.top_k,
                router=config.router,
                balance_scope=config.balance_scope,
                experts_implementation=config.experts_implementation,
                shared_d_ff=config.shared_d_ff or None,
                merged_experts=config.merged_experts,
                **config.router_options,
            )
        else:
            self.ffn = SwiGLU(config.d_model, config.d_ff)

    def forward(self, h_BSD: Tensor) -> tuple[Tensor, RoutingInfo | None]:
        if self.activation_checkpointing == "full":
            return checkpointed(self._forward, h_BSD)
        return self._forward(h_BSD)

    def _forward(self, h_BSD: Tensor) -> tuple[Tensor, RoutingInfo | None]:
        h_BSD = h_BSD + self.attn(self.attn_norm(h_BSD))
        if isinstance(self.ffn, MoELayer):
            x_BSD = self.ffn_norm(h_BSD)
            if self.activation_checkpointing == "moe":
                y_BSD, info = checkpointed(self.ffn, x_BSD)
            else:
                y_BSD, info = self.ffn(x_BSD)
            return h_BSD + y_BSD, info
        return h_BSD + self.ffn(self.ffn_norm(h_BSD)), None


class MoETransformer(nn.Module):
    """Decoder-only LM; ``model(input_ids_BS)`` → :class:`TransformerOutput`.

    Initialisation, one rule for every model (DESIGN.md §2), so that a dense baseline and an MoE
    model differ only in their FFN's routing, not in their starting scale:

    * embeddings (and the tied head) and the attention matrices: N(0, ``init_std``²);
    * every FFN matrix, whether of the dense SwiGLU, the shared expert or a routed expert:
      N(0, 1/fan_in) (:func:`moealign.nn.experts.init_swiglu_`);
    * depth scaling (GPT-2) on every residual output projection, i.e. on each matrix that writes
      into the residual stream: attention ``out``, the dense FFN's ``w_down``, the experts' and
      the shared expert's ``w_down``: their σ × 1/√(2L), L blocks of two residual branches;
    * routers: N(0, 1/D) (:class:`moealign.nn.routers.Router`).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config.validate()
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self._init_weights()
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _init_weights(self) -> None:
        std = self.config.init_std
        nn.init.normal_(self.embed.weight, std=std)
        nn.init.normal_(self.lm_head.weight, std=std)
        depth_scale = 1.0 / math.sqrt(2 * self.config.n_layers)
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=std)
            nn.init.normal_(block.attn.out.weight, std=std * depth_scale)
            ffn = block.ffn
            swiglus = [ffn] if isinstance(ffn, SwiGLU) else [ffn.experts, ffn.shared_expert]
            for swiglu in swiglus:
                if swiglu is not None:
                    swiglu.reset_parameters(residual_scale=depth_scale)

    @property
    def moe_layers(self) -> list[MoELayer]:
        return [block.ffn for block in self.blocks if isinstance(block.ffn, MoELayer)]

    def forward(self, input_ids_BS: Tensor) -> TransformerOutput:
        if input_ids_BS.shape[-1] > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {input_ids_BS.shape[-1]} exceeds "
                f"model.max_seq_len={self.config.max_seq_len}"
            )
        h_BSD = self.embed(input_ids_BS)
        routing = []
        for block in self.blocks:
            h_BSD, info = block(h_BSD)
            if info is not None:
                routing.append(info)
        return TransformerOutput(self.lm_head(self.norm(h_BSD)), routing)

    def parameter_counts(self) -> dict[str, int]:
        """Total parameters (tied weights once) and those active per token (K of E experts)."""
        total = sum(p.numel() for p in self.parameters())
        inactive = 0
        for layer in self.moe_layers:
            expert_params = sum(p.numel() for p in layer.experts.parameters())
            stored = layer.experts.n_experts  # E′ < E in a merged (R2) model
            inactive += expert_params * max(stored - layer.top_k, 0) // stored
        return {"total": total, "active": total - inactive}
