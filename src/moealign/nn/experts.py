"""Stacked SwiGLU experts and their token dispatch (DESIGN.md §2).

Shape letters (torchtitan style): T tokens, D model width, F expert hidden width, E experts,
K experts per token, S = T·K token slots.

Each expert computes y = W_down[e] (silu(W_gate[e] x) ⊙ W_up[e] x). The weights are stored fused
over experts as 3-D parameters in the transformers v5 layout split in two:
``w_gate``/``w_up`` (E, F, D) and ``w_down`` (E, D, F).

Dispatch sorts the token slots by expert and runs one grouped matmul per weight
(``torch.nn.functional.grouped_mm``). A per-expert loop is the reference implementation and
the fallback where the grouped kernel cannot run (strides that are not 16-byte aligned, CUDA
devices older than sm_90 or dtypes the kernel lacks).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EXPERT_IMPLEMENTATIONS = ("auto", "grouped_mm", "loop")

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_supported(x_SD: Tensor, *weights: Tensor) -> bool:
    """Whether the grouped-matmul kernel can run on these operands.

    The kernel needs every operand stride to be a multiple of 16 bytes (research-anchors.md
    §3.3), bf16 on CUDA (sm_90+; older CUDA devices go through a slow loop inside PyTorch), and
    float32 or bf16 on CPU.
    """
    if _grouped_mm is None:
        return False
    if x_SD.device.type == "cuda":
        if x_SD.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x_SD.device)[0] < 9:
            return False
    elif x_SD.device.type != "cpu" or x_SD.dtype not in (torch.float32, torch.bfloat16):
        return False
    align = 16 // x_SD.element_size()
    return all(w.shape[-1] % align == 0 and w.shape[-2] % align == 0 for w in weights)


def count_slots_per_expert(expert_of_slot_S: Tensor, n_experts: int) -> Tensor:
    """c_e = #{s : expert_of_slot_s = e} for e < n_experts (int64; larger ids are not counted).

    A scatter-add rather than ``torch.bincount``, which reads the maximum id back to the host
    on CUDA (a device sync on every layer call).
    """
    ids_S = expert_of_slot_S.reshape(-1).clamp(max=n_experts)  # ids >= n_experts share a spare bin
    counts = torch.zeros(n_experts + 1, dtype=torch.long, device=ids_S.device)
    return counts.scatter_add_(0, ids_S, torch.ones_like(ids_S))[:n_experts]


def init_swiglu_(w_gate: Tensor, w_up: Tensor, w_down: Tensor, residual_scale: float = 1.0) -> None:
    """The one FFN initialisation rule (DESIGN.md §2), in place, for a dense SwiGLU ((out, in)
    weights) and stacked experts ((E, out, in)) alike: every matrix N(0, 1/fan_in), fan_in =
    ``in`` (the last dimension: D for W_gate/W_up, the hidden width for W_down), and the
    residual output projection W_down also × ``residual_scale`` (the model's depth scaling).
    """
    with torch.no_grad():
        for weight, scale in ((w_gate, 1.0), (w_up, 1.0), (w_down, residual_scale)):
            nn.init.normal_(weight, std=scale / math.sqrt(weight.shape[-1]))


def expert_forward_grouped(
    x_SD: Tensor, w_gate_EFD: Tensor, w_up_EFD: Tensor, w_down_EDF: Tensor, offsets_E: Tensor
) -> Tensor:
    """SwiGLU of slot-sorted tokens, one grouped matmul per weight; offsets_E = cumsum(counts)."""
    gate_SF = _grouped_mm(x_SD, w_gate_EFD.transpose(-2, -1), offs=offsets_E)
    up_SF = _grouped_mm(x_SD, w_up_EFD.transpose(-2, -1), offs=offsets_E)
    return _grouped_mm(F.silu(gate_SF) * up_SF, w_down_EDF.transpose(-2, -1), offs=offsets_E)


# torch.compile traces grouped_mm through its fake-tensor kernel, which accepts bf16 only (the
# CUDA kernel's rule) while the CPU kernel runs fp32 as well: other dtypes run it eagerly.
_expert_forward_grouped_eager = torch.compiler.disable(expert_forward_grouped)


def expert_forward_loop(
    x_SD: Tensor, w_gate_EFD: Tensor, w_up_EFD: Tensor, w_down_EDF: Tensor, counts_E: list[int]
) -> Tensor:
    """Reference: the same SwiGLU as :func:`expert_forward_grouped`, one expert at a time."""
    outputs = []
    for e, x_chunk in enumerate(torch.split(x_SD, counts_E)):
        hidden = F.silu(x_chunk @ w_gate_EFD[e].T) * (x_chunk @ w_up_EFD[e].T)
        outputs.append(hidden @ w_down_EDF[e].T)
    return torch.cat(outputs) if outputs else x_SD.new_zeros(0, w_down_EDF.shape[1])


class SwiGLUExperts(nn.Module):
    """E SwiGLU experts with fused 3-D weights and sort-based grouped dispatch."""

    def __init__(self, n_experts: int, d_model: int, d_ff: int, implementation: str = "auto"):
        super().__init__()
        if implementation not in EXPERT_IMPLEMENTATIONS:
            raise ValueError(
                f"experts_implementation={implementation!r} is not accepted; "
                f"choose one of {EXPERT_IMPLEMENTATIONS}"
            )
        self.n_experts, self.d_model, self.d_ff = n_experts, d_model, d_ff
        self.implementation = implementation
        self.w_gate = nn.Parameter(torch.empty(n_experts, d_ff, d_model))
        self.w_up = nn.Parameter(torch.empty(n_experts, d_ff, d_model))
        self.w_down = nn.Parameter(torch.empty(n_experts, d_model, d_ff))
        self.reset_parameters()

    def reset_parameters(self, residual_scale: float = 1.0) -> None:
        """Each expert's matrices by the FFN rule of :func:`init_swiglu_` (as a dense SwiGLU
        of the same shapes)."""
        init_swiglu_(self.w_gate, self.w_up, self.w_down, residual_scale)

    def forward(
        self,
        x_TD: Tensor,
        topk_idx_TK: Tensor,
        topk_weight_TK: Tensor,
        keep_TK: Tensor | None = None,
    ) -> Tensor:
        """y_t = Σ_k weight_tk · expert_{idx_tk}(x_t) (DESIGN.md §2); keep=False slots drop out.

        Slots are sorted by expert (stable, so equal experts keep token order), the experts run
        as grouped matmuls, and each slot's output is scattered back to its (token, k) place and
        combined with one batched matmul, which is deterministic (no atomic adds).
        """
        n_tokens, top_k = topk_idx_TK.shape
        expert_of_slot_S = topk_idx_TK.reshape(-1)
        if keep_TK is not None:
            # Dropped slots get the out-of-range expert id E: they sort last and no group owns them.
            expert_of_slot_S = expert_of_slot_S.masked_fill(~keep_TK.reshape(-1), self.n_experts)
        order_S = torch.argsort(expert_of_slot_S, stable=True)
        counts_E = count_slots_per_expert(expert_of_slot_S, self.n_experts)
        n_routed = int(counts_E.sum()) if keep_TK is not None else n_tokens * top_k
        routed_slots = order_S[:n_routed]

        # index_select's backward is an index_add_, cheaper than the accumulating index_put_
        # behind x_TD[index]'s.
        x_SD = x_TD.index_select(0, routed_slots // top_k).to(_compute_dtype(x_TD))
        y_SD = self.run_experts(x_SD, counts_E)

        # Dropless, every slot is overwritten: no need to zero the buffer first.
        buffer = y_SD.new_zeros if keep_TK is not None else y_SD.new_empty
        y_slots = buffer(n_tokens * top_k, self.d_model).index_copy(0, routed_slots, y_SD)
        weight_T1K = topk_weight_TK.to(y_slots.dtype).unsqueeze(1)
        return torch.bmm(weight_T1K, y_slots.view(n_tokens, top_k, self.d_model)).squeeze(1)

    def run_experts(self, x_SD: Tensor, counts_E: Tensor) -> Tensor:
        """The experts on expert-sorted slots (``counts_E[e]`` consecutive rows for expert e).

        The seam that expert parallelism replaces (:mod:`moealign.distributed.parallel`): there the
        slots travel to the rank that holds their expert and back.
        """
        weights = [w.to(x_SD.dtype) for w in (self.w_gate, self.w_up, self.w_down)]
        if self._use_grouped(x_SD, weights):
            offsets = torch.cumsum(counts_E, 0, dtype=torch.int32)
            if x_SD.dtype == torch.bfloat16:
                return expert_forward_grouped(x_SD, *weights, offsets)
            return _expert_forward_grouped_eager(x_SD, *weights, offsets)
        return expert_forward_loop(x_SD, *weights, counts_E.tolist())

    def _use_grouped(self, x_SD: Tensor, weights: list[Tensor]) -> bool:
        if self.implementation == "loop":
            return False
        supported = grouped_mm_supported(x_SD, *weights)
        if self.implementation == "grouped_mm" and not supported:
            raise ValueError(
                "experts_implementation='grouped_mm' cannot run here: it needs torch>=2.9, "
                "16-byte aligned strides (d_model and d_ff multiples of 4 in fp32, 8 in bf16), "
                f"and fp32/bf16 on CPU or bf16 on CUDA sm_90+ (got {x_SD.dtype} on "
                f"{x_SD.device}, d_model={self.d_model}, d_ff={self.d_ff}); use 'auto' or 'loop'"
            )
        return supported


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The activation dtype, honouring an enclosing autocast region."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype
