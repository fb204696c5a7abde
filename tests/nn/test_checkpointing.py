"""Activation checkpointing: the same routing, losses and gradients as keeping every
activation, the expert-bias counts counted once, and fewer bytes saved for the backward pass."""

import typing

import pytest
import torch
import torch.nn.functional as F

from moealign.config import TrainConfig
from moealign.nn.checkpointing import (
    ACTIVATION_CHECKPOINTING,
    apply_activation_checkpointing,
    is_recomputing,
)
from moealign.nn.compile import compile_blocks, compile_unavailable_reason
from moealign.nn.transformer import ModelConfig, MoETransformer

# A tiny model (four heads and top-2 by default) of three blocks.
TINY = dict(vocab_size=64, d_model=32, n_layers=3, max_seq_len=16, expert_d_ff=16, n_experts=4)

# Every router option that draws noise (jitter, logit dropout: the recomputation must draw the
# same), the expert-bias counts (a forward side effect), capacity dropping and the MPI router.
ROUTERS = {
    "softmax_topk_noisy_bias": dict(
        router="softmax_topk",
        router_options=dict(jitter=0.1, logit_dropout=0.2, expert_bias=True),
    ),
    "mpi_capacity": dict(router="mpi", router_options=dict(capacity_factor=1.0, expert_bias=True)),
    "dense_layer_between": dict(moe_every=2, router_options=dict(expert_bias=True)),
}


def train_forward_backward(mode: str, options: dict, compile: bool = False):
    """One training forward and backward of a seeded tiny model with checkpointing ``mode``
    (and its blocks compiled if ``compile``); the loss holds every routing term (LM + balance +
    z-loss + a term on the probabilities)."""
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig(**TINY | options))
    apply_activation_checkpointing(model, mode)
    if compile:
        compile_blocks(model)
    model.train()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)  # the routers' noise
    output = model(ids)
    lm = F.cross_entropy(output.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    routing = output.routing
    loss = lm + sum(
        0.01 * r.load_balance_loss + 0.001 * r.z_loss + (r.probs**2).mean() for r in routing
    )
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    counts = [layer.router.tokens_per_expert.clone() for layer in model.moe_layers]
    return loss.detach(), routing, grads, counts


@pytest.mark.parametrize("options", ROUTERS.values(), ids=ROUTERS.keys())
@pytest.mark.parametrize("mode", ["full", "moe"])
def test_checkpointing_changes_no_decision_loss_or_gradient(mode, options):
    loss, routing, grads, counts = train_forward_backward("none", options)
    ac_loss, ac_routing, ac_grads, ac_counts = train_forward_backward(mode, options)
    # Routing decisions and expert counts are discrete: exactly equal.
    for plain, checkpointed in zip(routing, ac_routing, strict=True):
        assert torch.equal(plain.topk_idx, checkpointed.topk_idx)
        assert torch.equal(plain.expert_counts, checkpointed.expert_counts)
        assert (plain.keep is None) == (checkpointed.keep is None)
        if plain.keep is not None:
            assert torch.equal(plain.keep, checkpointed.keep)
    # The recomputation in backward does not count the tokens a second time.
    for plain, checkpointed in zip(counts, ac_counts, strict=True):
        assert plain.sum() > 0
        assert torch.equal(plain, checkpointed)
    # The forward runs the same kernels on the same inputs; the backward may sum gradient
    # contributions in another order (the recomputed graph), so fp32 tolerance there.
    torch.testing.assert_close(ac_loss, loss, rtol=0, atol=0)
    assert grads.keys() == ac_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(ac_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def saved_activation_bytes(mode: str) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of one training forward (the
    saved-tensor pack hook sees each; a checkpointed region keeps only its inputs)."""
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig(**TINY))
    apply_activation_checkpointing(model, mode)
    parameters = {p.data_ptr() for p in model.parameters()}
    total = 0

    def pack(tensor):
        nonlocal total
        if tensor.data_ptr() not in parameters:
            total += tensor.numel() * tensor.element_size()
        return tensor

    ids = torch.randint(0, 64, (4, 16))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(ids).logits.sum().backward()
    return total


def test_checkpointing_keeps_fewer_activations():
    saved = {mode: saved_activation_bytes(mode) for mode in ACTIVATION_CHECKPOINTING}
    assert saved["full"] < saved["moe"] < saved["none"]


def test_recomputation_flag_is_set_only_inside_the_backward_rerun():
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig(**TINY))
    apply_activation_checkpointing(model, "full")
    seen = []
    model.blocks[0].attn.register_forward_hook(lambda *_: seen.append(is_recomputing()))
    model(torch.randint(0, 64, (1, 8))).logits.sum().backward()
    assert seen == [False, True]
    assert not is_recomputing()


def test_evaluation_forward_is_not_checkpointed():
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig(**TINY))
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        plain = model(ids).logits
        apply_activation_checkpointing(model, "full")
        assert torch.equal(model(ids).logits, plain)


def test_the_config_offers_the_modes_there_are():
    hint = typing.get_type_hints(TrainConfig)["activation_checkpointing"]
    assert typing.get_args(hint) == ACTIVATION_CHECKPOINTING


def test_unknown_mode_is_rejected():
    model = MoETransformer(ModelConfig(**TINY))
    with pytest.raises(ValueError, match="activation_checkpointing='selective' is not accepted"):
        apply_activation_checkpointing(model, "selective")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "moe"])
def test_compiled_checkpointed_blocks_count_tokens_once(mode):
    unavailable = compile_unavailable_reason("cpu")
    if unavailable is not None:
        pytest.skip(f"torch.compile cannot run here: {unavailable}")
    options = dict(router_options=dict(expert_bias=True))
    _, routing, _, counts = train_forward_backward("none", options)
    _, compiled_routing, _, compiled_counts = train_forward_backward(mode, options, compile=True)
    for plain, compiled in zip(routing, compiled_routing, strict=True):
        assert torch.equal(plain.expert_counts, compiled.expert_counts)
    for plain, compiled in zip(counts, compiled_counts, strict=True):
        assert torch.equal(plain, compiled)
