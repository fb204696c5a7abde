"""Tests for moealign.optim (DESIGN.md §6) against torch's own optimizers and float64 references."""

import copy
import math

import pytest
import torch
from torch import nn

from moealign.config import load_config
from moealign.optim.optimizers import (
    ADAMW,
    MATRIX,
    NS_COEFFICIENTS,
    AdamH,
    Muon,
    MuonH,
    build_optimizer,
    newton_schulz_orthogonalize,
    parameter_groups,
)

VOCAB, WIDTH, HIDDEN, EXPERTS = 32, 16, 8, 4


class TinyMoE(nn.Module):
    """Every kind of parameter DESIGN.md §6 sorts; no forward needed."""

    def __init__(self, tie_head: bool = True, head_name: str = "lm_head") -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.norm = nn.RMSNorm(WIDTH)
        self.attention = nn.Linear(WIDTH, WIDTH)
        self.router = nn.Linear(WIDTH, EXPERTS, bias=False)
        self.w_gate_EFD = nn.Parameter(torch.randn(EXPERTS, HIDDEN, WIDTH))
        self.w_down_EDF = nn.Parameter(torch.randn(EXPERTS, WIDTH, HIDDEN))
        head = nn.Linear(WIDTH, VOCAB, bias=False)
        if tie_head:
            head.weight = self.embed.weight
        setattr(self, head_name, head)
        self.frozen = nn.Parameter(torch.randn(4, 4), requires_grad=False)


def set_grads(params, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- parameter groups


def test_parameter_groups_follow_design_section_6():
    model = TinyMoE()
    matrix, adamw = parameter_groups(model)
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    assert ids(matrix) == ids(
        [model.attention.weight, model.router.weight, model.w_gate_EFD, model.w_down_EDF]
    )
    assert ids(adamw) == ids(
        [model.embed.weight, model.norm.weight, model.attention.bias]
    )  # tied head is the embedding tensor: listed once
    assert len(matrix) + len(adamw) == len(ids(matrix) | ids(adamw))
    assert ids(matrix) | ids(adamw) == ids(trainable(model))


@pytest.mark.parametrize("head_name", ["lm_head", "output"])
def test_parameter_groups_untied_head_goes_to_adamw(head_name):
    model = TinyMoE(tie_head=False, head_name=head_name)
    matrix, adamw = parameter_groups(model)
    head_weight = getattr(model, head_name).weight
    assert any(p is head_weight for p in adamw)
    assert not any(p is head_weight for p in matrix)
    assert len(matrix) == 4 and len(adamw) == 4


# ----------------------------------------------------------------------------- Muon


def reference_newton_schulz_float64(update: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """DESIGN.md §6 written out for one 2-D matrix in float64."""
    a, b, c = NS_COEFFICIENTS
    x = update.double()
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    x = x / x.norm()
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if transposed else x


@pytest.mark.parametrize("shape", [(24, 16), (16, 24), (3, 20, 12)])
def test_newton_schulz_float32_matches_float64_reference(shape):
    update = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    result = newton_schulz_orthogonalize(update, dtype=torch.float32)
    assert result.dtype == torch.float32 and result.shape == update.shape
    slices = update.reshape(-1, *shape[-2:])
    expected = torch.stack([reference_newton_schulz_float64(m) for m in slices]).reshape(shape)
    torch.testing.assert_close(result.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("adjust_lr_fn", ["original", "match_rms_adamw"])
def test_muon_matches_torch_muon_on_2d(adjust_lr_fn):
    torch.manual_seed(0)
    ours = [nn.Parameter(torch.randn(shape)) for shape in [(32, 16), (16, 40), (24, 24)]]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    hyper = dict(lr=0.02, weight_decay=0.1, momentum=0.95, adjust_lr_fn=adjust_lr_fn)
    ours_optimizer = Muon(ours, **hyper)
    theirs_optimizer = torch.optim.Muon(theirs, **hyper)
    for step in range(5):
        set_grads(ours, seed=step)
        set_grads(theirs, seed=step)
        ours_optimizer.step()
        theirs_optimizer.step()
        for mine, reference in zip(ours, theirs, strict=True):
            torch.testing.assert_close(mine, reference, rtol=1e-6, atol=1e-6)
    assert not torch.equal(ours[0], torch.randn(32, 16))  # parameters actually moved


@pytest.mark.parametrize("ns_dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("shape", [(EXPERTS, 24, 12), (EXPERTS, 12, 24)])
def test_muon_3d_update_is_per_expert_2d_update(ns_dtype, shape):
    stacked = nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(1)))
    slices = [nn.Parameter(stacked.detach()[e].clone()) for e in range(shape[0])]
    hyper = dict(lr=0.05, weight_decay=0.1, adjust_lr_fn="original", ns_dtype=ns_dtype)
    stacked_optimizer, slice_optimizer = Muon([stacked], **hyper), Muon(slices, **hyper)
    for step in range(4):
        set_grads([stacked], seed=step)
        for e, p in enumerate(slices):
            p.grad = stacked.grad[e].clone()
        stacked_optimizer.step()
        slice_optimizer.step()
        torch.testing.assert_close(stacked.detach(), torch.stack([p.detach() for p in slices]))


# ----------------------------------------------------------------------------- Hyperball


def reference_directions(name: str, params: list[torch.Tensor]):
    """An independent torch optimizer whose step, read as before − after, is U's direction.

    AdamH: torch.optim.Adam with lr 1 moves by m̂/(√v̂+ε). MuonH: torch.optim.Muon with
    weight decay 0 moves by lr·scale·NS(Nesterov momentum); only the direction matters.
    Works on 2-D slices (one per expert) so torch.optim.Muon accepts them.
    """
    slices = [
        nn.Parameter(m.clone()) for p in params for m in p.detach().reshape(-1, *p.shape[-2:])
    ]
    if name == "adamh":
        optimizer = torch.optim.Adam(slices, lr=1.0, betas=(0.9, 0.95), eps=1e-8)
    else:
        optimizer = torch.optim.Muon(slices, lr=1.0, weight_decay=0.0, momentum=0.95)

    def step(grads: list[torch.Tensor]) -> list[torch.Tensor]:
        grad_slices = [m for g in grads for m in g.reshape(-1, *g.shape[-2:])]
        before = [s.detach().clone() for s in slices]
        for s, g in zip(slices, grad_slices, strict=True):
            s.grad = g.clone()
        optimizer.step()
        return [(b - s.detach()).double() for b, s in zip(before, slices, strict=True)]

    return step


@pytest.mark.parametrize("name", ["adamh", "muonh", "adamh_released"])
def test_hyperball_keeps_weight_norm_and_step_length(name):
    """Every step moves by lr·c·R_W along the reference direction, then back to the sphere; with
    AdamH's released bias correction by lr·c·R_W/(1 − β₁ᵗ)."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(24, 16)), nn.Parameter(torch.randn(3, 16, 24))]
    released = name == "adamh_released"
    name = "adamh" if released else name
    lr = 0.01
    if name == "adamh":
        optimizer = AdamH(params, lr=lr, bias_correction="released" if released else "paper")
    else:
        optimizer = MuonH(params, lr=lr)
    update_constant = 0.2 * math.sqrt(1024)
    assert optimizer.param_groups[0]["update_constant"] == pytest.approx(update_constant)
    reference_step = reference_directions(name, params)
    for p in params:  # projected onto the sphere at construction
        norms = p.detach().norm(dim=(-2, -1))
        torch.testing.assert_close(norms, torch.full_like(norms, math.sqrt(p.shape[-2])))
    for step in range(4):
        before = [m.double() for p in params for m in p.detach().clone().reshape(-1, *p.shape[-2:])]
        set_grads(params, seed=step)
        directions = reference_step([p.grad for p in params])
        optimizer.step()
        after = [m.double() for p in params for m in p.detach().reshape(-1, *p.shape[-2:])]
        step_lr = lr / (1 - 0.9 ** (step + 1)) if released else lr
        for w_old, w_new, direction in zip(before, after, directions, strict=True):
            radius = math.sqrt(w_old.shape[0])
            assert abs(w_new.norm().item() - radius) <= 1e-5 * radius
            # The applied pre-projection weight is W − t·Û on the line along the reference
            # direction and α·W_new on the ray of the result: solve for (t, α), check t.
            unit_direction = direction / direction.norm()
            basis = torch.stack([unit_direction.flatten(), w_new.flatten()], dim=1)
            t, alpha = torch.linalg.lstsq(basis, w_old.flatten().unsqueeze(1)).solution.flatten()
            residual = w_old.flatten() - basis @ torch.stack([t, alpha])
            assert residual.norm().item() <= 1e-5 * radius
            assert t.item() == pytest.approx(step_lr * update_constant * radius, rel=1e-4)
            pre_projection = w_old - step_lr * update_constant * radius * unit_direction
            expected = radius * pre_projection / pre_projection.norm()
            torch.testing.assert_close(w_new, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("bias_correction", "degrees"),
    [("paper", math.degrees(math.atan(0.064))), ("released", math.degrees(math.atan(0.64)))],
)
def test_adamh_first_step_rotation_by_hand(bias_correction, degrees):
    """W = I₂ (on its sphere, R = √2), G = [[1, 1], [1, −1]] ⟂ W. At t = 1, m̂ = G and v̂ = G²,
    so normalize(U) = sign(G)/2 ⟂ W and W − s·R·Û turns W by atan(s): s = lr·c = 0.01·6.4 (paper,
    3.66°) or lr·c/(1 − β₁) = 0.64 (released: 32.62°). The projection back to the sphere keeps
    the angle."""
    weight = nn.Parameter(torch.eye(2, dtype=torch.float64))
    optimizer = AdamH([weight], lr=0.01, betas=(0.9, 0.95), bias_correction=bias_correction)
    assert optimizer.param_groups[0]["update_constant"] == pytest.approx(6.4)
    weight.grad = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    optimizer.step()
    new = weight.detach()
    assert new.norm().item() == pytest.approx(math.sqrt(2), rel=1e-12)
    cosine = (new * torch.eye(2, dtype=torch.float64)).sum() / 2  # ‖W‖ = ‖W'‖ = √2
    assert math.degrees(math.acos(cosine.item())) == pytest.approx(degrees, rel=1e-6)


def test_adamh_bias_correction_comes_from_the_run_config():
    config = load_config(None, ["optim.name=adamh", 'optim.options={bias_correction="released"}'])
    optimizer = build_optimizer(TinyMoE(), config.optim.name, lr=0.01, **config.optim.options)
    matrix_group = next(g for g in optimizer.param_groups if g["algorithm"] == MATRIX)
    assert matrix_group["bias_correction"] == "released"
    assert AdamH([nn.Parameter(torch.randn(4, 4))]).param_groups[0]["bias_correction"] == "paper"
    with pytest.raises(ValueError, match=r"bias_correction='both'.*'paper'"):
        build_optimizer(TinyMoE(), "adamh", lr=0.01, bias_correction="both")
    with pytest.raises(ValueError, match=r"\['bias_correction'\].*'muonh'"):
        build_optimizer(TinyMoE(), "muonh", lr=0.01, bias_correction="released")


@pytest.mark.parametrize("optimizer_class", [AdamH, MuonH])
def test_hyperball_leaves_expert_without_gradient_in_place(optimizer_class):
    expert_weights = nn.Parameter(torch.randn(3, 8, 6))
    optimizer = optimizer_class([expert_weights], lr=0.05, update_constant=7.34)
    assert optimizer.param_groups[0]["update_constant"] == 7.34
    before = expert_weights.detach().clone()
    expert_weights.grad = torch.randn(3, 8, 6)
    expert_weights.grad[1] = 0.0  # expert 1 received no tokens
    optimizer.step()
    assert torch.isfinite(expert_weights).all()
    assert torch.equal(expert_weights[1], before[1])
    assert not torch.allclose(expert_weights[0], before[0])


# ----------------------------------------------------------------------------- AdamW groups


@pytest.mark.parametrize("name", ["adamw", "muon", "adamh", "muonh"])
def test_adamw_groups_match_torch_adamw(name):
    torch.manual_seed(0)
    model = TinyMoE()
    optimizer = build_optimizer(model, name, lr=0.01, weight_decay=0.1, matrix_lr=0.02)
    reference_model = copy.deepcopy(model)
    _, adamw_params = parameter_groups(reference_model)
    reference = torch.optim.AdamW(
        [
            {"params": [p for p in adamw_params if p.ndim >= 2], "weight_decay": 0.1},
            {"params": [p for p in adamw_params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=0.01,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    _, ours_adamw = parameter_groups(model)
    for step in range(4):
        set_grads(trainable(model), seed=step)
        set_grads(trainable(reference_model), seed=step)
        optimizer.step()
        reference.step()
        for mine, theirs in zip(ours_adamw, adamw_params, strict=True):
            assert torch.equal(mine, theirs)
    assert not torch.equal(model.embed.weight, TinyMoE().embed.weight)


def test_build_optimizer_groups_and_scheduler():
    model = TinyMoE()
    optimizer = build_optimizer(model, "muon", lr=1e-3, weight_decay=0.05, matrix_lr=0.02)
    matrix_group, embed_group, gain_group = optimizer.param_groups
    assert (matrix_group["algorithm"], matrix_group["lr"], matrix_group["weight_decay"]) == (
        MATRIX,
        0.02,
        0.05,
    )
    assert (embed_group["algorithm"], embed_group["weight_decay"]) == (ADAMW, 0.05)
    assert (gain_group["algorithm"], gain_group["weight_decay"]) == (ADAMW, 0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** (step + 1))
    assert [g["lr"] for g in optimizer.param_groups] == [0.01, 5e-4, 5e-4]
    set_grads(trainable(model), seed=0)
    optimizer.step()
    scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == [0.005, 2.5e-4, 2.5e-4]


# ----------------------------------------------------------------------------- state round-trip


@pytest.mark.parametrize("name", ["adamw", "muon", "adamh", "muonh"])
def test_state_dict_round_trip_resumes_bit_for_bit(name, tmp_path):
    torch.manual_seed(0)
    model = TinyMoE()
    hyperball = name in ("adamh", "muonh")
    optimizer = build_optimizer(
        model, name, lr=0.01, **({"update_constant": 7.34} if hyperball else {})
    )
    for step in range(3):
        set_grads(trainable(model), seed=step)
        optimizer.step()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "c")
    checkpoint = torch.load(tmp_path / "c", weights_only=True)
    resumed_model = TinyMoE()
    resumed_model.load_state_dict(checkpoint["model"])
    # Different hyperparameters on purpose: the loaded state must bring back the saved ones.
    options = {"update_constant": 1.0} if hyperball else {}
    resumed = build_optimizer(resumed_model, name, lr=0.5, **options)
    resumed.load_state_dict(checkpoint["optimizer"])
    for step in range(3, 6):
        set_grads(trainable(model), seed=step)
        set_grads(trainable(resumed_model), seed=step)
        optimizer.step()
        resumed.step()
    for original, restored in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(original, restored)


def test_adamh_state_saved_before_bias_correction_existed_resumes_in_the_paper_form():
    """Checkpoints written before the option have no "bias_correction" in their groups; they
    were trained with the paper form, which is the constructor's default."""
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(6, 4))
    optimizer = AdamH([weight], lr=0.01)
    weight.grad = torch.randn(6, 4)
    optimizer.step()
    state = copy.deepcopy(optimizer.state_dict())
    del state["param_groups"][0]["bias_correction"]
    resumed = AdamH([nn.Parameter(weight.detach().clone())], lr=0.01)
    resumed.load_state_dict(state)
    assert resumed.param_groups[0]["bias_correction"] == "paper"
    weight.grad = torch.randn(6, 4)
    resumed.param_groups[0]["params"][0].grad = weight.grad.clone()
    optimizer.step()
    resumed.step()
    assert torch.equal(weight, resumed.param_groups[0]["params"][0])


# ----------------------------------------------------------------------------- bad input


def test_build_optimizer_rejects_unknown_name_and_option():
    with pytest.raises(ValueError, match=r"optim.name='sgd'.*'adamw'"):
        build_optimizer(TinyMoE(), "sgd", lr=0.01)
    with pytest.raises(ValueError, match=r"\['adjust_lr_fn'\].*'adamh'"):
        build_optimizer(TinyMoE(), "adamh", lr=0.01, adjust_lr_fn="original")


@pytest.mark.parametrize(
    ("optimizer_class", "kwargs", "field"),
    [
        (Muon, {"adjust_lr_fn": "spectral"}, "adjust_lr_fn"),
        (Muon, {"momentum": 1.5}, "momentum"),
        (Muon, {"ns_steps": 0}, "ns_steps"),
        (Muon, {"ns_dtype": "float8"}, "ns_dtype"),
        (Muon, {"lr": -1.0}, "lr"),
        (AdamH, {"betas": (1.0, 0.5)}, "betas"),
        (AdamH, {"update_constant": -1.0}, "update_constant"),
        (MuonH, {"reference_width": 0}, "reference_width"),
    ],
)
def test_bad_hyperparameters_raise(optimizer_class, kwargs, field):
    with pytest.raises(ValueError, match=rf"{field}=.*expected"):
        optimizer_class([nn.Parameter(torch.randn(4, 4))], **kwargs)


def test_bad_param_groups_raise():
    with pytest.raises(ValueError, match=r"shape \(4,\).*ndim >= 2"):
        Muon([nn.Parameter(torch.randn(4))])
    with pytest.raises(ValueError, match=r"algorithm='sgd'.*'matrix'"):
        Muon([{"params": [nn.Parameter(torch.randn(4, 4))], "algorithm": "sgd"}])
    zero_expert = torch.randn(2, 4, 4)
    zero_expert[1] = 0.0
    with pytest.raises(ValueError, match=r"shape \(2, 4, 4\).*zero matrix"):
        MuonH([nn.Parameter(zero_expert)])
