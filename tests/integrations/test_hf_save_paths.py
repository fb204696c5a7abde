"""Swapped routers survive every save path of transformers (save_pretrained, a safetensors state
dict, an HF Trainer checkpoint): plain transformers reloads them with identical logits, loading
a native weight into swapped gates (or swap_routers(keep_routing=True)) continues the MPI
parametrisation, and output_router_logits / the balance loss work on swapped models."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers")  # the models under test are its own

from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from helpers_hf import FAMILIES, SOFTMAX_FAMILIES, batch, tiny_model
from moealign.integrations.hf import (
    MoealignGate,
    capture_routing,
    expert_matrix,
    moe_blocks,
    swap_routers,
)

MPI = {"c_prime": 2.0, "temperature": 0.7}  # τ ≠ 1, so the native weight is R_eff/τ


def swapped(family: str, seed: int = 0):
    """A model of ``family`` with MPI gates (DeepSeek-V3, which cannot be swapped, native)."""
    model = tiny_model(family, seed=seed)
    if family != "deepseek_v3":
        swap_routers(model, kind="mpi", **MPI)
    return model


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


def effective_rows_64(model) -> list[torch.Tensor]:
    """R_eff = C · normalize(W_gᵀ W_g r) per layer (DESIGN.md §3), in float64 from the raw R."""
    rows = []
    for block in moe_blocks(model):
        r = block.mlp.gate.router.weight.detach().double()
        w_gate = expert_matrix(block.mlp.experts, "gate").detach().double()
        power = torch.einsum("efd,ef->ed", w_gate, torch.einsum("efd,ed->ef", w_gate, r))
        c = MPI["c_prime"] / math.sqrt(r.shape[0])
        rows.append(c * power / power.norm(dim=-1, keepdim=True))
    return rows


@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_is_native_and_save_pretrained_reloads_plain(family, tmp_path):
    model, input_ids = swapped(family), batch()
    state = model.state_dict()
    native_keys = set(tiny_model(family).state_dict())
    assert set(state) == native_keys  # no mlp.gate.router.* entry
    if family != "deepseek_v3":
        for block, rows in zip(moe_blocks(model), effective_rows_64(model), strict=True):
            weight = state[f"model.layers.{block.layer}.mlp.gate.weight"]
            assert weight.dtype == torch.float32
            # fp32 power step and normalisation against the float64 reference
            expected = rows / MPI["temperature"]
            torch.testing.assert_close(weight.double(), expected, rtol=1e-5, atol=1e-6)
    model.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    assert not any(isinstance(b.mlp.gate, MoealignGate) for b in moe_blocks(reloaded))
    torch.testing.assert_close(
        logits(reloaded.eval(), input_ids), logits(model, input_ids), rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("family", SOFTMAX_FAMILIES)
def test_safetensors_state_dict_loads_plain_and_back_into_swapped_gates(family, tmp_path):
    model, input_ids = swapped(family), batch()
    expected = logits(model, input_ids)
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    state = load_file(tmp_path / "model.safetensors")
    plain = tiny_model(family, seed=1)
    plain.load_state_dict(state, strict=True)
    torch.testing.assert_close(logits(plain, input_ids), expected, rtol=0, atol=1e-5)
    # Into another swapped model (other weights): the load hook solves for R, so the MPI
    # routers reproduce the saved routing from their own power step.
    other = swapped(family, seed=2)
    other.load_state_dict(state, strict=True)
    torch.testing.assert_close(logits(other, input_ids), expected, rtol=0, atol=1e-5)
    for block, rows in zip(moe_blocks(other), effective_rows_64(other), strict=True):
        native = state[f"model.layers.{block.layer}.mlp.gate.weight"].double()
        torch.testing.assert_close(rows / MPI["temperature"], native, rtol=1e-5, atol=1e-6)
        assert isinstance(block.mlp.gate, MoealignGate)


@pytest.mark.parametrize("family", SOFTMAX_FAMILIES)
def test_keep_routing_continues_mpi_on_a_plain_reload(family, tmp_path):
    model, input_ids = swapped(family), batch()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    pretrained = tiny_model(family)  # its rows are no MPI router's effective rows
    with pytest.raises(ValueError, match="not one an mpi router with c_prime=4.0"):
        swap_routers(pretrained, kind="mpi", keep_routing=True)
    assert not any(isinstance(b.mlp.gate, MoealignGate) for b in moe_blocks(pretrained))
    swap_routers(reloaded, kind="mpi", keep_routing=True, **MPI)
    torch.testing.assert_close(
        logits(reloaded, input_ids), logits(model, input_ids), rtol=0, atol=1e-5
    )
    # It is MPI: changing the experts' gate rows moves the routing (a plain router ignores it).
    before = capture_routing(reloaded, input_ids).layers[-1].logits
    with torch.no_grad():
        moe_blocks(reloaded)[-1].mlp.experts.gate_up_proj.mul_(1.5).add_(0.1)
    assert (capture_routing(reloaded, input_ids).layers[-1].logits - before).abs().max() > 1e-3


@pytest.mark.parametrize("family", SOFTMAX_FAMILIES)
def test_output_router_logits_and_balance_loss_on_swapped_models(family, tmp_path):
    input_ids = batch()
    native = tiny_model(family)
    same = swap_routers(tiny_model(family), kind="softmax_topk")
    with torch.no_grad():
        native(input_ids, output_router_logits=True)  # hooks installed before the swap, too
        swap_routers(native, kind="softmax_topk")
        expected = tiny_model(family)(input_ids, labels=input_ids, output_router_logits=True)
        for model in (native, same):
            output = model(input_ids, labels=input_ids, output_router_logits=True)
            assert len(output.router_logits) == len(moe_blocks(model))
            torch.testing.assert_close(output.aux_loss, expected.aux_loss, rtol=0, atol=1e-6)
            torch.testing.assert_close(output.loss, expected.loss, rtol=0, atol=1e-6)
    # MPI: the balance loss of the swapped model is that of its plain reload, and its recorded
    # router logits are the gates' (those capture_routing reads).
    model = swapped(family)
    model.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        output = model(input_ids, labels=input_ids, output_router_logits=True)
        reference = plain(input_ids, labels=input_ids, output_router_logits=True)
        capture = capture_routing(model, input_ids)
    torch.testing.assert_close(output.aux_loss, reference.aux_loss, rtol=0, atol=1e-5)
    for recorded, layer in zip(output.router_logits, capture.layers, strict=True):
        torch.testing.assert_close(recorded, layer.logits.reshape(recorded.shape))


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.rows[index], "labels": self.rows[index]}


@pytest.mark.parametrize("family", SOFTMAX_FAMILIES)
def test_trainer_checkpoint_of_a_swapped_model_reloads_plain(family, tmp_path):
    model, input_ids = swapped(family).train(), batch()
    model.config.output_router_logits = True  # the balance loss joins the training loss
    routers_before = [b.mlp.gate.router.weight.detach().clone() for b in moe_blocks(model)]
    arguments = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        save_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    Trainer(model=model, args=arguments, train_dataset=TokenDataset(batch(3, (4, 7)))).train()
    changed = [
        not torch.equal(b.mlp.gate.router.weight, before)
        for b, before in zip(moe_blocks(model), routers_before, strict=True)
    ]
    assert all(changed)  # the MPI routers trained
    reloaded, info = AutoModelForCausalLM.from_pretrained(
        tmp_path / "checkpoint-2", dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), info
    torch.testing.assert_close(
        logits(reloaded.eval(), input_ids), logits(model.eval(), input_ids), rtol=0, atol=1e-5
    )
