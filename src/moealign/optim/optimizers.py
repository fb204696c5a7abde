"""Optimizers for MoE training: Muon (3-D aware), AdamH / MuonH (Hyperball), parameter grouping.

DESIGN.md §6. Matrices (attention, each expert's matrices, routers) go to a matrix optimizer;
embeddings, the output head, norm gains and biases go to AdamW. Every optimizer here is ONE
``torch.optim.Optimizer`` that carries both kinds of parameter group, told apart by
``group["algorithm"]`` in {"matrix", "adamw"}, so one ``state_dict()`` holds everything and torch
learning-rate schedulers drive every group through its own ``lr``.

Matrix tensors are read as a batch of matrices over their last two dimensions: a 2-D weight is one
(out, in) matrix; a 3-D expert tensor shaped (E, out, in) is E matrices, each orthogonalised,
normalised and projected on its own, in one batched call (no Python loop over experts).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.optim.adam import adam as adam_functional

MATRIX = "matrix"
ADAMW = "adamw"
ALGORITHMS = (MATRIX, ADAMW)

# Keller Jordan's quintic Newton–Schulz coefficients (a, b, c).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
ADJUST_LR_FNS = ("original", "match_rms_adamw")
NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
# Defaults for AdamW groups that do not name their own values (build_optimizer always names them).
ADAMW_GROUP_DEFAULTS: dict[str, Any] = {"betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.0}
# Relative distance to the sphere below which project_to_sphere leaves a tensor untouched.
SPHERE_RTOL = 1e-6
OPTIMIZER_NAMES = ("adamw", "muon", "adamh", "muonh")
BIAS_CORRECTIONS = ("paper", "released")
BiasCorrection = Literal["paper", "released"]
HEAD_PARAMETER_NAMES = (("lm_head", "weight"), ("output", "weight"))


# ----------------------------------------------------------------------------- parameter groups


def parameter_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split trainable parameters into (matrix_params, adamw_params), DESIGN.md §6.

    AdamW: parameters of ``nn.Embedding`` modules, the output head (a parameter whose qualified
    name ends in ``lm_head.weight`` or ``output.weight``, compared by dotted components), and every
    parameter with ndim < 2 (norm gains, biases). Matrix optimizer: every other parameter with
    ndim ≥ 2 (attention matrices, (E, out, in) expert tensors, (E, D) router weights). A tensor
    shared by several modules (a head tied to the embedding) appears once; parameters with
    ``requires_grad=False`` are left out.
    """
    embedding_ids = {
        id(p)
        for module in model.modules()
        if isinstance(module, nn.Embedding)
        for p in module.parameters(recurse=False)
    }
    named = list(model.named_parameters(remove_duplicate=False))
    head_ids = {id(p) for name, p in named if tuple(name.split(".")[-2:]) in HEAD_PARAMETER_NAMES}
    matrix_params: list[nn.Parameter] = []
    adamw_params: list[nn.Parameter] = []
    seen: set[int] = set()
    for _, p in named:
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        if id(p) in embedding_ids or id(p) in head_ids or p.ndim < 2:
            adamw_params.append(p)
        else:
            matrix_params.append(p)
    return matrix_params, adamw_params


# ----------------------------------------------------------------------------- matrix primitives


def newton_schulz_orthogonalize(
    update: Tensor,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    steps: int = 5,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """Approximate orthogonalisation U S' Vᵀ of each matrix in ``update`` (shape (..., rows, cols)).

    DESIGN.md §6: X = U/‖U‖_F (per matrix, ‖·‖ clamped at ``eps``), then ``steps`` iterations
    X ← aX + (bA + cA²)X with A = XXᵀ, computed on the transpose when rows > cols. Leading
    dimensions are a batch: one batched matmul per iteration for all experts. The iteration runs
    in ``dtype``; bfloat16 with ``torch.baddbmm`` reproduces ``torch.optim.Muon`` (torch 2.13
    ``_zeropower_via_newtonschulz`` casts to bfloat16 and uses ``torch.addmm``) bit for bit.
    Returns a tensor of ``dtype`` with the shape of ``update``.
    """
    a, b, c = coefficients
    transposed = update.size(-2) > update.size(-1)
    x_BRC = update.to(dtype).reshape(-1, *update.shape[-2:])
    if transposed:
        x_BRC = x_BRC.mT
    x_BRC = x_BRC / x_BRC.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram_BRR = x_BRC @ x_BRC.mT
        polynomial_BRR = torch.baddbmm(gram_BRR, gram_BRR, gram_BRR, beta=b, alpha=c)
        x_BRC = torch.baddbmm(x_BRC, polynomial_BRR, x_BRC, beta=a)
    if transposed:
        x_BRC = x_BRC.mT
    return x_BRC.reshape(update.shape)


def muon_lr_scale(shape: torch.Size | tuple[int, ...], adjust_lr_fn: str) -> float:
    """Muon's per-matrix learning-rate factor for a matrix of (rows, cols) = shape[-2:].

    "original" (Keller Jordan): √max(1, rows/cols); "match_rms_adamw" (Moonlight): 0.2·√max(rows,
    cols), so that Muon's update RMS matches AdamW's. DESIGN.md §6.
    """
    rows, cols = shape[-2], shape[-1]
    if adjust_lr_fn == "original":
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"adjust_lr_fn={adjust_lr_fn!r} is not supported; accepted: {ADJUST_LR_FNS}")


def _orthogonalized_momentum(grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
    """Muon direction: M ← βM + (1−β)G; U = (1−β)G + βM if Nesterov else M; return NS(U)."""
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
    buffer = state["momentum_buffer"]
    momentum = group["momentum"]
    buffer.lerp_(grad, 1 - momentum)
    update = grad.lerp(buffer, momentum) if group["nesterov"] else buffer
    return newton_schulz_orthogonalize(
        update,
        group["ns_coefficients"],
        group["ns_steps"],
        group["eps"],
        NS_DTYPES[group["ns_dtype"]],
    )


def _matrix_frobenius_norm(x: Tensor) -> Tensor:
    """‖x‖_F of each matrix over the last two dimensions, kept for broadcasting."""
    return x.norm(dim=(-2, -1), keepdim=True)


def sphere_radius(shape: torch.Size | tuple[int, ...]) -> float:
    """Hyperball radius R_W = √n_out with n_out = shape[-2] (per expert for (E, out, in))."""
    return math.sqrt(shape[-2])


def hyperball_step_(param: Tensor, direction: Tensor, lr: float, update_constant: float) -> None:
    """In place: W ← R · normalize_F(W − lr · c · R · normalize_F(U)), per matrix. DESIGN.md §6.

    R = √n_out. A matrix whose direction U is exactly zero (an expert that received no tokens and
    has no momentum yet) is left bit for bit where it is instead of being divided by zero.
    """
    radius = sphere_radius(param.shape)
    direction = direction.to(param.dtype)
    direction_norm = _matrix_frobenius_norm(direction)
    moves = direction_norm > 0
    step_scale = torch.where(moves, (lr * update_constant * radius) / direction_norm, 0.0)
    param.sub_(direction * step_scale)
    param.mul_(torch.where(moves, radius / _matrix_frobenius_norm(param), 1.0))


# ----------------------------------------------------------------------------- validation


def _is_probability_pair(value: Any) -> bool:
    return len(value) == 2 and all(0.0 <= beta < 1.0 for beta in value)


_GROUP_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lr": (lambda v: v >= 0.0, "a number >= 0"),
    "weight_decay": (lambda v: v >= 0.0, "a number >= 0"),
    "momentum": (lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    "nesterov": (lambda v: isinstance(v, bool), "True or False"),
    "eps": (lambda v: v > 0.0, "a number > 0"),
    "betas": (_is_probability_pair, "two numbers in [0, 1)"),
    "ns_steps": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "ns_coefficients": (lambda v: len(v) == 3, "three numbers (a, b, c)"),
    "ns_dtype": (lambda v: v in NS_DTYPES, f"one of {tuple(NS_DTYPES)}"),
    "adjust_lr_fn": (lambda v: v in ADJUST_LR_FNS, f"one of {ADJUST_LR_FNS}"),
    "update_constant": (lambda v: v > 0.0, "a number > 0"),
    "reference_width": (lambda v: v > 0, "a number > 0"),
    "bias_correction": (lambda v: v in BIAS_CORRECTIONS, f"one of {BIAS_CORRECTIONS}"),
}


def _validate_group(group: dict[str, Any]) -> None:
    """Raise ValueError naming the first hyperparameter of ``group`` that is out of range."""
    for key, (is_valid, accepted) in _GROUP_CHECKS.items():
        if key not in group:
            continue
        try:
            valid = bool(is_valid(group[key]))
        except TypeError:
            valid = False
        if not valid:
            raise ValueError(f"{key}={group[key]!r} is not accepted; expected {accepted}")


# ----------------------------------------------------------------------------- optimizers


class MatrixOptimizerWithAdamW(torch.optim.Optimizer, abc.ABC):
    """One optimizer holding matrix groups and AdamW groups (``group["algorithm"]``).

    AdamW groups are stepped by torch's own functional Adam with decoupled weight decay, i.e. the
    exact arithmetic of ``torch.optim.AdamW``; they use the keys ``lr``, ``betas``, ``eps``,
    ``weight_decay`` (defaults ``ADAMW_GROUP_DEFAULTS``, ``lr`` from the constructor). Matrix
    groups take the subclass's defaults and are stepped by ``_matrix_step``. A group without an
    ``algorithm`` key is a matrix group.
    """

    def __init__(self, params: Iterable[Any], lr: float, matrix_defaults: dict[str, Any]) -> None:
        # Kept apart from ``self.defaults`` so AdamW groups do not inherit matrix-only keys.
        self._matrix_defaults = matrix_defaults
        super().__init__(params, {"lr": lr})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        algorithm = param_group.setdefault("algorithm", MATRIX)
        param_group.setdefault("lr", self.defaults["lr"])
        if algorithm not in ALGORITHMS:
            raise ValueError(
                f"param group algorithm={algorithm!r} is not supported; accepted: {ALGORITHMS}"
            )
        defaults = self._matrix_defaults if algorithm == MATRIX else ADAMW_GROUP_DEFAULTS
        for key, value in defaults.items():
            param_group.setdefault(key, value)
        self._complete_group(param_group)
        _validate_group(param_group)
        params = param_group["params"]
        param_group["params"] = [params] if isinstance(params, Tensor) else list(params)
        if algorithm == MATRIX:
            for p in param_group["params"]:
                if p.ndim < 2:
                    raise ValueError(
                        f"matrix param group got a parameter of shape {tuple(p.shape)}; accepted: "
                        "ndim >= 2 (put gains and biases in an 'adamw' group)"
                    )
        super().add_param_group(param_group)

    def _complete_group(self, param_group: dict[str, Any]) -> None:
        """Hook for subclasses to derive group values from other values before validation."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Also on ``load_state_dict``: a matrix group saved before one of today's options
        existed gets that option's constructor value (what it was trained with)."""
        super().__setstate__(state)
        for group in self.param_groups:
            if group.get("algorithm", MATRIX) == MATRIX:
                for key, value in getattr(self, "_matrix_defaults", {}).items():
                    group.setdefault(key, value)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One step of every group: AdamW groups as torch.optim.AdamW, matrix groups per class."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["algorithm"] == ADAMW:
                self._adamw_step(group)
            else:
                for p in group["params"]:
                    if p.grad is not None:
                        self._matrix_step(p, group)
        return loss

    def _adamw_step(self, group: dict[str, Any]) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self._adam_state(p)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        beta1, beta2 = group["betas"]
        adam_functional(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            decoupled_weight_decay=True,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )

    def _adam_state(self, param: Tensor) -> dict[str, Any]:
        """Adam moments of ``param``, laid out as torch.optim.AdamW's (step: CPU float tensor)."""
        state = self.state[param]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    @abc.abstractmethod
    def _matrix_step(self, param: Tensor, group: dict[str, Any]) -> None:
        """Update one matrix parameter in place; each subclass defines its rule."""


class Muon(MatrixOptimizerWithAdamW):
    """Muon (Keller Jordan) for matrix groups, batched over leading dims; AdamW groups alongside.

    DESIGN.md §6, per matrix (per expert of an (E, out, in) tensor):
    M ← βM + (1−β)G; U = (1−β)G + βM (Nesterov) or M; O = NS₅(U) (``newton_schulz_orthogonalize``);
    W ← W(1 − lr·wd) (decoupled, unadjusted lr); W ← W − lr·s·O with s = ``muon_lr_scale``.
    On 2-D parameters with ns_dtype="bfloat16" this is ``torch.optim.Muon`` (torch 2.13).
    Defaults follow torch.optim.Muon except lr (Keller Jordan's 0.02).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.02,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        ns_steps: int = 5,
        eps: float = 1e-7,
        adjust_lr_fn: str = "original",
        ns_dtype: str = "bfloat16",
    ) -> None:
        matrix_defaults = {
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_coefficients": tuple(ns_coefficients),
            "ns_steps": ns_steps,
            "eps": eps,
            "adjust_lr_fn": adjust_lr_fn,
            "ns_dtype": ns_dtype,
        }
        super().__init__(params, lr, matrix_defaults)

    def _matrix_step(self, param: Tensor, group: dict[str, Any]) -> None:
        orthogonal = _orthogonalized_momentum(param.grad, self.state[param], group)
        lr = group["lr"]
        param.mul_(1 - lr * group["weight_decay"])
        param.add_(orthogonal, alpha=-lr * muon_lr_scale(param.shape, group["adjust_lr_fn"]))


class HyperballOptimizer(MatrixOptimizerWithAdamW):
    """Hyperball wrapper (Wen et al., arXiv 2606.16899; DESIGN.md §6; research-mpi.md §2.1).

    For every matrix W (per expert for (E, out, in) tensors), R_W = √n_out:
    W ← R_W · normalize_F(W − lr · c · R_W · normalize_F(U)), with U the subclass's direction.
    Both ‖W‖_F and the step's Frobenius norm are fixed, replacing weight decay (matrix groups have
    none). Update constant c: ``update_constant`` if given, else the paper's 0.2·√d_in_ref with
    d_in_ref = ``reference_width`` (1024 → c = 6.4); the released MPI code uses c = 7.34.
    Matrices are put on their spheres at construction (``project_to_sphere``).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        matrix_defaults: dict[str, Any],
        update_constant: float | None,
        reference_width: int,
    ) -> None:
        matrix_defaults = {
            **matrix_defaults,
            "update_constant": update_constant,
            "reference_width": reference_width,
        }
        super().__init__(params, lr, matrix_defaults)
        self.project_to_sphere()

    def _complete_group(self, param_group: dict[str, Any]) -> None:
        if param_group["algorithm"] == MATRIX and param_group["update_constant"] is None:
            _validate_group({"reference_width": param_group["reference_width"]})
            param_group["update_constant"] = 0.2 * math.sqrt(param_group["reference_width"])

    @torch.no_grad()
    def project_to_sphere(self) -> None:
        """W ← R_W · W/‖W‖_F for every managed matrix (per expert), R_W = √n_out.

        A tensor whose matrices all lie on their spheres already (‖W‖_F within a relative
        ``SPHERE_RTOL`` of R_W, i.e. float rounding) is left bit for bit as it is, so building the
        optimizer after loading a checkpoint's weights does not perturb an exact resume.
        """
        for group in self.param_groups:
            if group["algorithm"] != MATRIX:
                continue
            for p in group["params"]:
                norm = _matrix_frobenius_norm(p)
                if not bool((norm > 0).all()):
                    raise ValueError(
                        f"a matrix parameter of shape {tuple(p.shape)} has a zero matrix; "
                        "Hyperball needs every matrix nonzero to put it on its sphere"
                    )
                radius = sphere_radius(p.shape)
                if not bool(((norm - radius).abs() <= SPHERE_RTOL * radius).all()):
                    p.mul_(radius / norm)

    def _matrix_step(self, param: Tensor, group: dict[str, Any]) -> None:
        direction = self._direction(param, group)
        lr = group["lr"] * self._step_size_factor(param, group)
        hyperball_step_(param, direction, lr, group["update_constant"])

    @abc.abstractmethod
    def _direction(self, param: Tensor, group: dict[str, Any]) -> Tensor:
        """The base optimizer's direction U for ``param``; each subclass defines it."""

    def _step_size_factor(self, param: Tensor, group: dict[str, Any]) -> float:
        """A factor on lr for this step (1: the step norm is lr·c·R_W, the Hyperball rule)."""
        return 1.0


class AdamH(HyperballOptimizer):
    """Hyperball around Adam: U = m̂/(√v̂ + ε), bias-corrected, betas (0.9, 0.95). DESIGN.md §6.

    m ← β₁m + (1−β₁)G, v ← β₂v + (1−β₂)G², m̂ = m/(1−β₁ᵗ), v̂ = v/(1−β₂ᵗ) (the arithmetic of
    torch.optim.Adam). eps defaults to 1e-8 (the released MPI code uses 1e-7).

    ``bias_correction`` says where the first moment's 1/(1−β₁ᵗ) goes (research-mpi.md §2.1):

    * ``"paper"`` (default; the Hyperball rule as the papers state it, a fixed update norm):
      W ← R·normalize(W − lr·c·R·normalize(m̂/(√v̂ + ε))). The factor sits inside the
      normalisation, where it cancels: every step, the first included, moves by lr·c·R.
    * ``"released"`` (the MPI authors' AdamwH code, ``step_size = lr / bias_correction1``):
      W ← R·normalize(W − (lr/(1−β₁ᵗ))·c·R·normalize(m/(√v̂ + ε))). Early steps are larger by
      1/(1−β₁ᵗ): 10× at t = 1 with β₁ = 0.9, tending to 1. For a gradient orthogonal to W the
      first step turns W by atan(s) with s = lr·c/(1−β₁) (lr 0.01, c 6.4: 32.6°) instead of
      atan(lr·c) (3.7°).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        update_constant: float | None = None,
        reference_width: int = 1024,
        bias_correction: BiasCorrection = "paper",
    ) -> None:
        matrix_defaults = {"betas": tuple(betas), "eps": eps, "bias_correction": bias_correction}
        super().__init__(params, lr, matrix_defaults, update_constant, reference_width)

    def _direction(self, param: Tensor, group: dict[str, Any]) -> Tensor:
        grad = param.grad
        state = self._adam_state(param)
        state["step"] += 1
        step = state["step"].item()
        beta1, beta2 = group["betas"]
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denominator = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**step)).add_(group["eps"])
        if group["bias_correction"] == "released":
            return state["exp_avg"] / denominator  # 1/(1−β₁ᵗ) goes on the step size instead
        return state["exp_avg"] / denominator / (1 - beta1**step)

    def _step_size_factor(self, param: Tensor, group: dict[str, Any]) -> float:
        if group["bias_correction"] == "released":
            return 1.0 / (1.0 - group["betas"][0] ** self.state[param]["step"].item())
        return 1.0


class MuonH(HyperballOptimizer):
    """Hyperball around Muon: U = NS₅(Nesterov momentum), as in ``Muon``. DESIGN.md §6.

    The released MPI code uses momentum 0.9 and Polar-Express coefficients; here momentum and
    ``ns_coefficients`` are options with Keller Jordan's defaults (0.95, quintic (a, b, c)).
    Muon's momentum has no bias correction, in the papers and in the released MuonH alike, so
    the step norm is lr·c·R from the first step and AdamH's ``bias_correction`` has no
    counterpart here.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        ns_steps: int = 5,
        eps: float = 1e-7,
        ns_dtype: str = "bfloat16",
        update_constant: float | None = None,
        reference_width: int = 1024,
    ) -> None:
        matrix_defaults = {
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_coefficients": tuple(ns_coefficients),
            "ns_steps": ns_steps,
            "eps": eps,
            "ns_dtype": ns_dtype,
        }
        super().__init__(params, lr, matrix_defaults, update_constant, reference_width)

    def _direction(self, param: Tensor, group: dict[str, Any]) -> Tensor:
        return _orthogonalized_momentum(param.grad, self.state[param], group)


# ----------------------------------------------------------------------------- factory

# Options each optimizer name accepts in build_optimizer, beyond lr/weight_decay/betas/matrix_lr.
# "adamw_eps" is the eps of the AdamW groups inside the combined optimizers.
_MUON_OPTIONS = ("momentum", "nesterov", "ns_coefficients", "ns_steps", "eps", "ns_dtype")
_HYPERBALL_OPTIONS = ("update_constant", "reference_width")
ACCEPTED_OPTIONS: dict[str, tuple[str, ...]] = {
    "adamw": ("eps",),
    "muon": (*_MUON_OPTIONS, "adjust_lr_fn", "adamw_eps"),
    "adamh": ("eps", *_HYPERBALL_OPTIONS, "bias_correction", "adamw_eps"),
    "muonh": (*_MUON_OPTIONS, *_HYPERBALL_OPTIONS, "adamw_eps"),
}


def build_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    matrix_lr: float | None = None,
    **options: Any,
) -> torch.optim.Optimizer:
    """Build the optimizer ``name`` for ``model`` with the DESIGN.md §6 parameter groups.

    Groups (from ``parameter_groups``), each with its own ``lr`` for schedulers:
      1. matrices: ``matrix_lr`` (default ``lr``), the named optimizer; weight decay
         ``weight_decay`` for "adamw" and "muon" (decoupled), none for "adamh"/"muonh" (the
         Hyperball fixes the norm instead);
      2. AdamW, embeddings and output head (ndim ≥ 2): ``lr``, ``weight_decay``;
      3. AdamW, gains and biases (ndim < 2): ``lr``, no weight decay (common practice, as in
         nanoGPT and the MPI code).
    "adamw" returns a plain ``torch.optim.AdamW`` over the same three groups. ``options`` name
    the knobs of each optimizer (see ``ACCEPTED_OPTIONS``), e.g. momentum, ns_steps,
    update_constant, reference_width, eps, adjust_lr_fn, ns_dtype, adamw_eps, and AdamH's
    bias_correction ("paper" | "released"; from a run config: ``optim.options =
    {bias_correction = "released"}``).
    """
    if name not in OPTIMIZER_NAMES:
        raise ValueError(f"optim.name={name!r} is not supported; accepted: {OPTIMIZER_NAMES}")
    unknown = sorted(set(options) - set(ACCEPTED_OPTIONS[name]))
    if unknown:
        raise ValueError(
            f"optim options {unknown} are not accepted by optim.name={name!r}; "
            f"accepted: {ACCEPTED_OPTIONS[name]}"
        )
    matrix_params, adamw_params = parameter_groups(model)
    adamw_eps = options.get("eps", 1e-8) if name == "adamw" else options.pop("adamw_eps", 1e-8)
    adamw_group = {"algorithm": ADAMW, "lr": lr, "betas": tuple(betas), "eps": adamw_eps}
    adamw_groups = [
        {
            **adamw_group,
            "params": [p for p in adamw_params if p.ndim >= 2],
            "weight_decay": weight_decay,
        },
        {**adamw_group, "params": [p for p in adamw_params if p.ndim < 2], "weight_decay": 0.0},
    ]
    matrix_group: dict[str, Any] = {
        "params": matrix_params,
        "lr": lr if matrix_lr is None else matrix_lr,
    }
    if name == "adamw":
        groups = [{**matrix_group, "weight_decay": weight_decay}, *adamw_groups]
        for group in groups:
            group.pop("algorithm", None)
            _validate_group(group)
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=adamw_eps)
    if name == "muon":
        return Muon([matrix_group, *adamw_groups], lr=lr, weight_decay=weight_decay, **options)
    if name == "adamh":
        return AdamH([matrix_group, *adamw_groups], lr=lr, betas=betas, **options)
    return MuonH([matrix_group, *adamw_groups], lr=lr, **options)
