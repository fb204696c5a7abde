"""Typed run configuration: dataclasses, TOML loading, ``--set`` overrides, validation.

A run is described by one :class:`RunConfig` holding the model, data, optimizer, loss and
training sections (DESIGN.md §8: the resolved config is recorded with every run). Every value
is checked up front — unknown keys, wrong types and out-of-range values raise one
:class:`ConfigError` naming the dotted field (``optim.lr``), the value given and what is
accepted — so a run never fails minutes in on a typo.

Coercion rules (the same for TOML files and ``--set`` overrides): ``int`` is accepted where a
``float`` is expected; TOML arrays become tuples/lists; ``Literal[...]`` fields accept only the
listed values; ``bool`` fields accept only ``true``/``false``. An override's value is parsed as
a TOML literal (``--set optim.betas=[0.9,0.95]``, ``--set model.router_options={c_prime=2.0}``);
for a string field a bare word is taken as the string itself (``--set optim.schedule=constant``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

from moealign.nn.transformer import ModelConfig

__all__ = [
    "COMPRESSION_METHODS",
    "CompressionConfig",
    "ConfigError",
    "DataConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "build_config",
    "load_config",
    "parse_override",
]


class ConfigError(ValueError):
    """A configuration value that is unknown, of the wrong type or out of range.

    ``field`` is the dotted path of the offending entry (empty for whole-file problems);
    ``detail`` says what was given and what is accepted.
    """

    def __init__(self, field: str, detail: str) -> None:
        self.field = field
        self.detail = detail
        super().__init__(f"{field}: {detail}" if field else detail)

    def under(self, prefix: str) -> ConfigError:
        """The same error with its field path placed under section ``prefix``."""
        if not prefix:
            return self
        return ConfigError(f"{prefix}.{self.field}" if self.field else prefix, self.detail)


@dataclass(frozen=True)
class Bounds:
    """Numeric range for a config field: ``ge``/``gt`` lower, ``le``/``lt`` upper bound."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def contains(self, value: float) -> bool:
        return not (
            (self.ge is not None and value < self.ge)
            or (self.gt is not None and value <= self.gt)
            or (self.le is not None and value > self.le)
            or (self.lt is not None and value >= self.lt)
        )

    def describe(self) -> str:
        parts = [
            f"{op} {bound:g}"
            for op, bound in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
            if bound is not None
        ]
        return "a finite number " + " and ".join(parts)


def bounded(default: Any, **bounds: float) -> Any:
    """A dataclass field whose (numeric, or each element of a tuple) value must lie in bounds."""
    return field(default=default, metadata={"bounds": Bounds(**bounds)})


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "none"
    if origin in (tuple, list):
        args = typing.get_args(tp)
        kind = "array"
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"an {kind} of {len(args)} ({', '.join(_type_name(a) for a in args)})"
        return f"an {kind} of {_type_name(args[0])}" if args else f"an {kind}"
    if origin is dict:
        return "a table (dict)"
    if tp is Any:
        return "any value"
    if dataclasses.is_dataclass(tp):
        return f"a table of {tp.__name__} fields"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Return ``value`` converted to type ``tp`` or raise :class:`ConfigError` at ``path``."""

    def reject() -> ConfigError:
        return ConfigError(path, f"got {value!r}; expected {_type_name(tp)}")

    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return value
        raise reject()
    if origin in (Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        for option in typing.get_args(tp):
            if option is type(None):
                continue
            try:
                return _coerce(value, option, path)
            except ConfigError:
                continue
        raise reject()
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise reject()
        return build_config(tp, value, path)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise reject()
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise reject()
            items = [
                _coerce(v, a, f"{path}[{i}]")
                for i, (v, a) in enumerate(zip(value, args, strict=True))
            ]
        else:
            item_tp = args[0] if args else Any
            items = [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise reject()
        args = typing.get_args(tp)
        value_tp = args[1] if args else Any
        return {k: _coerce(v, value_tp, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise reject()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise reject()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise reject()
    if tp is str:
        if isinstance(value, str):
            return value
        raise reject()
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise reject()


def _check_bounds(name: str, value: Any, bounds: Bounds) -> None:
    numbers = value if isinstance(value, (tuple, list)) else (value,)
    for number in numbers:
        if number is None:
            continue
        if not (math.isfinite(number) and bounds.contains(number)):
            raise ConfigError(name, f"got {value!r}; expected {bounds.describe()}")


class _Validated:
    """Mixin: on construction check each field's type and declared bounds."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = _coerce(getattr(self, f.name), hints[f.name], f.name)
            object.__setattr__(self, f.name, value)
            if "bounds" in f.metadata:
                _check_bounds(f.name, value, f.metadata["bounds"])


@dataclass
class DataConfig(_Validated):
    """Which data to train on (DESIGN.md §7); built by
    :func:`moealign.data.build.build_training_data`.

    ``source``: ``tasks`` (the synthetic multi-task suite), ``text`` (the Python standard
    library's sources, at most ``text_max_bytes``), ``mixed`` (both, ``text_to_task_ratio``
    text batches per task batch) or ``files`` (local ``.txt``/``.jsonl`` ``paths``).
    ``tasks`` restricts the suite (empty = all); ``heldout_tasks``/``heldout_compositions``
    are kept out of training (None = the suite's defaults); ``loss_on`` takes the task loss
    on the answer only or on every token. ``format``: ``plain`` task prompts, or
    ``multiple_choice`` (:func:`moealign.data.multiple_choice_view` with ``n_options`` options,
    seeded by ``seed``: the prompt lists lettered options and the answer is the gold letter).
    ``tokenizer``: ``byte`` (258 ids) or ``bpe`` (``vocab_size`` ids, trained on the text and
    cached in ``cache_dir``).
    """

    source: Literal["tasks", "text", "mixed", "files"] = "mixed"
    tokenizer: Literal["byte", "bpe"] = "byte"
    vocab_size: int = bounded(4096, ge=258)
    tasks: tuple[str, ...] = ()
    heldout_tasks: tuple[str, ...] | None = None
    heldout_compositions: tuple[str, ...] | None = None
    examples_per_task: int = bounded(1000, ge=10)
    loss_on: Literal["answer", "all"] = "answer"
    format: Literal["plain", "multiple_choice"] = "plain"
    n_options: int = bounded(4, ge=2, le=26)
    text_max_bytes: int = bounded(2_000_000, ge=1000)
    text_to_task_ratio: float = bounded(1.0, gt=0)
    paths: tuple[str, ...] = ()
    cache_dir: str = ".cache/moealign"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.source == "files" and not self.paths:
            raise ConfigError("paths", "got (); expected at least one path when source='files'")


@dataclass
class OptimConfig(_Validated):
    """Optimizer and learning-rate schedule (DESIGN.md §6).

    lr(t) = lr · m(t) with the warm-up + cosine multiplier of
    :class:`moealign.optim.schedules.WarmupCosine`. ``matrix_lr`` (None = ``lr``) is the learning
    rate of the matrix optimizer for Muon/MuonH/AdamH; ``options`` go to
    :func:`moealign.optim.build_optimizer` unchanged. ``grad_clip`` 0 disables clipping.
    """

    name: Literal["adamw", "muon", "adamh", "muonh"] = "adamw"
    lr: float = bounded(3e-3, gt=0)
    weight_decay: float = bounded(0.1, ge=0)
    betas: tuple[float, float] = bounded((0.9, 0.95), ge=0, lt=1)
    grad_clip: float = bounded(1.0, ge=0)
    warmup_steps: int = bounded(10, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = bounded(0.1, ge=0, le=1)
    matrix_lr: float | None = bounded(None, gt=0)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class LossConfig(_Validated):
    """Coefficients of the auxiliary router losses (DESIGN.md §4).

    L_total = L_lm + balance_coef · mean_l L_bal,l + z_coef · mean_l L_z,l (+ plugged-in terms).
    """

    balance_coef: float = bounded(1e-2, ge=0)
    z_coef: float = bounded(1e-3, ge=0)


@dataclass
class AlignmentConfig(_Validated):
    """Routing manifold alignment during training (DESIGN.md §4; :mod:`moealign.alignment.term`).

    L_total += λ(t) · mean_τ Σ_l KL(p_l(·|τ) ‖ q_l). ``schedule``: ``none`` (off), ``fixed``,
    ``warmup`` (λ_target·min(1, t/warmup_steps)) or ``warmup_anneal`` (then linear to
    ``lambda_final`` over ``anneal_steps`` from ``anneal_start``). ``prior``: ``uniform``,
    ``marginal`` (EMA of the all-task routing with decay ``prior_decay``) or ``file``
    (safetensors ``prior_path`` holding an (L, E) tensor ``prior``).
    """

    schedule: Literal["none", "fixed", "warmup", "warmup_anneal"] = "none"
    lambda_target: float = bounded(0.1, ge=0)
    lambda_final: float = bounded(0.0, ge=0)
    warmup_steps: int = bounded(0, ge=0)
    anneal_start: int = bounded(0, ge=0)
    anneal_steps: int = bounded(0, ge=0)
    prior: Literal["uniform", "marginal", "file"] = "uniform"
    prior_decay: float = bounded(0.99, ge=0, lt=1)
    prior_path: str = ""


@dataclass
class GuardrailConfig(_Validated):
    """Routing-collapse guardrails (DESIGN.md §4; the guide's Step 7;
    :mod:`moealign.alignment.guardrails`).

    After every optimizer step, a layer whose normalised expert-usage entropy falls under
    ``min_usage_entropy``, whose mean normalised per-token router entropy falls under
    ``min_token_entropy`` or whose share of dead experts exceeds ``max_dead_fraction`` is
    unhealthy; ``patience`` unhealthy steps in a row trigger ``policy``: ``reduce_lambda``
    (λ ← ``factor``·λ), ``entropy_bonus`` (add ``entropy_bonus`` to the bonus weight γ of the
    alignment term), ``slow_warmup`` (stretch the λ warm-up by 1/``factor``) or ``stop`` (end
    training, then evaluate); ``off`` only watches. After an action the guardrail waits
    ``cooldown`` steps. Every trigger is an ``event`` record in ``metrics.jsonl``.
    """

    policy: Literal["off", "reduce_lambda", "entropy_bonus", "slow_warmup", "stop"] = "off"
    min_usage_entropy: float = bounded(0.5, ge=0, le=1)
    min_token_entropy: float = bounded(0.0, ge=0, le=1)
    max_dead_fraction: float = bounded(0.5, ge=0, le=1)
    patience: int = bounded(3, ge=1)
    cooldown: int = bounded(20, ge=0)
    factor: float = bounded(0.5, gt=0, lt=1)
    entropy_bonus: float = bounded(0.01, gt=0)


@dataclass
class TrainConfig(_Validated):
    """The training loop (DESIGN.md §8).

    ``batch_size`` is the global number of sequences per optimizer step; it is split into
    ``grad_accum`` micro-batches per data-parallel rank. ``eval_every``/``log_every``/
    ``checkpoint_every`` are in optimizer steps (0 = only at the end). ``task_eval_examples``:
    at the end, generate answers for at most this many examples per task of each evaluation set
    of the task suite (seen-task test, held-out tasks/compositions, long lengths; 0 = skip).
    ``tensorboard`` and ``wandb`` mirror ``metrics.jsonl`` to TensorBoard / offline W&B
    (:mod:`moealign.training.loggers`). ``parallel`` picks how several ranks (torchrun) share the
    work (:mod:`moealign.distributed.parallel`, DESIGN.md §9): ``ddp`` replicates the model,
    ``fsdp`` shards every block and the root with FSDP2 (AdamW only), ``ep`` shards the experts
    over ``ep_size`` ranks of a (dp, ep) device mesh; one process ignores it.
    """

    steps: int = bounded(100, ge=1)
    batch_size: int = bounded(8, ge=1)
    grad_accum: int = bounded(1, ge=1)
    seq_len: int = bounded(64, ge=2)
    eval_every: int = bounded(50, ge=0)
    eval_batches: int = bounded(4, ge=1)
    log_every: int = bounded(10, ge=1)
    checkpoint_every: int = bounded(50, ge=0)
    keep_checkpoints: int = bounded(3, ge=1)
    task_eval_examples: int = bounded(50, ge=0)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    tensorboard: bool = False
    wandb: bool = False
    parallel: Literal["ddp", "fsdp", "ep"] = "ddp"
    ep_size: int = bounded(1, ge=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ep_size > 1 and self.parallel != "ep":
            raise ConfigError(
                "ep_size",
                f"got {self.ep_size}; expected 1 unless parallel='ep' (got {self.parallel!r})",
            )
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                "batch_size",
                f"got {self.batch_size}; expected a multiple of grad_accum={self.grad_accum}",
            )


COMPRESSION_METHODS = ("frequency", "naee", "msmoe", "submoe")


@dataclass
class CompressionConfig(_Validated):
    """How a compressed run's weights were made (``moealign compress``;
    :mod:`moealign.compression`): ``method`` (``none`` for an ordinary run), the ``source`` run
    directory, its ``source_n_experts`` E, the ``keep_experts`` E′ (= model.n_experts), the
    ``calibration`` data (``training data`` or a file) and its ``calibration_tokens``, the
    ``seed`` and the Sub-MoE joint-SVD ``rank`` (None = full rank). Recorded in ``config.json``
    only when ``method`` is not ``none``.
    """

    method: Literal["none", "frequency", "naee", "msmoe", "submoe"] = "none"
    source: str = ""
    source_n_experts: int = bounded(0, ge=0)
    keep_experts: int = bounded(0, ge=0)
    calibration: str = ""
    calibration_tokens: int = bounded(0, ge=0)
    seed: int = 0
    rank: int | None = bounded(None, ge=1)


@dataclass
class RunConfig(_Validated):
    """Everything that defines a run; ``to_dict()`` is what the run directory records."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    guardrails: GuardrailConfig = field(default_factory=GuardrailConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    name: str = "run"
    out_dir: str = "runs"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.train.seq_len > self.model.max_seq_len:
            raise ConfigError(
                "train.seq_len",
                f"got {self.train.seq_len}; expected <= model.max_seq_len={self.model.max_seq_len}",
            )
        if self.optim.warmup_steps > self.train.steps:
            raise ConfigError(
                "optim.warmup_steps",
                f"got {self.optim.warmup_steps}; expected <= train.steps={self.train.steps}",
            )

        if self.alignment.schedule != "none" and self.model.ffn != "moe":
            raise ConfigError(
                "alignment.schedule",
                f"got {self.alignment.schedule!r}; the routing alignment needs model.ffn='moe' "
                "(use 'none' for a dense model)",
            )
        if self.train.parallel == "fsdp" and self.optim.name != "adamw":
            raise ConfigError(
                "optim.name",
                f"got {self.optim.name!r} with train.parallel='fsdp'; FSDP2 shards each matrix "
                "by rows, and Muon/Hyperball need whole matrices: use 'adamw', or "
                "train.parallel='ddp'/'ep' (which keep whole matrices, experts per expert)",
            )
        if self.train.parallel == "ep":
            if self.model.ffn != "moe":
                raise ConfigError(
                    "train.parallel", "got 'ep'; expert parallelism needs model.ffn='moe'"
                )
            if self.model.n_experts % self.train.ep_size:
                raise ConfigError(
                    "train.ep_size",
                    f"got {self.train.ep_size}; expected a divisor of "
                    f"model.n_experts={self.model.n_experts}",
                )
        compression = self.compression
        if compression.method != "none" and not (
            compression.keep_experts == self.model.n_experts < compression.source_n_experts
        ):
            raise ConfigError(
                "compression.keep_experts",
                f"got {compression.keep_experts}; expected model.n_experts="
                f"{self.model.n_experts} < compression.source_n_experts="
                f"{compression.source_n_experts}",
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready nested dict (tuples as lists) that :func:`build_config` reads back. The
        ``compression`` section is left out of an ordinary run's (method ``none``), so that its
        record is what it was before compression existed."""
        data = _jsonable(dataclasses.asdict(self))
        if self.compression.method == "none":
            del data["compression"]
        return data

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def build_config(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, validating every key and value.

    Raises :class:`ConfigError` naming the dotted field for unknown keys, wrong types and
    out-of-range values (including the ``ValueError`` of a dataclass's own checks).
    """
    names = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in names:
            where = f"{path}.{key}" if path else key
            raise ConfigError(where, f"unknown key; accepted keys: {', '.join(sorted(names))}")
    kwargs = {
        key: _coerce(value, hints[key], f"{path}.{key}" if path else key)
        for key, value in data.items()
    }
    try:
        built = cls(**kwargs)
        if callable(getattr(built, "validate", None)):  # e.g. ModelConfig.validate()
            built.validate()
    except ConfigError as err:
        raise err.under(path) from None
    except (ValueError, TypeError) as err:
        message = str(err)
        # A section whose own checks already name the dotted field needs no second prefix.
        raise ConfigError("" if message.startswith(f"{path}.") else path, message) from None
    return built


def _field_type(path: list[str], cls: type | None = None) -> Any:
    """Type of the dotted field ``path`` in ``cls`` (default :class:`RunConfig`; Any inside
    free-form dicts)."""
    tp: Any = RunConfig if cls is None else cls
    for depth, key in enumerate(path):
        if dataclasses.is_dataclass(tp):
            hints = typing.get_type_hints(tp)
            if key not in hints:
                raise ConfigError(
                    ".".join(path[: depth + 1]),
                    f"unknown key; accepted keys: {', '.join(sorted(hints))}",
                )
            tp = hints[key]
        elif typing.get_origin(tp) is dict or tp is dict:
            args = typing.get_args(tp)
            tp = args[1] if args else Any
        else:
            raise ConfigError(".".join(path[:depth]), "is not a table; cannot set a sub-key")
    return tp


def _is_string_field(tp: Any) -> bool:
    if tp is str:
        return True
    origin = typing.get_origin(tp)
    if origin is Literal:
        return all(isinstance(a, str) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return any(_is_string_field(a) for a in typing.get_args(tp) if a is not type(None))
    return False


def parse_override(text: str, cls: type | None = None) -> tuple[list[str], Any]:
    """Parse ``section.key=value`` into (path, value); the value is a TOML literal.

    A bare word for a string-typed field (of ``cls``, default :class:`RunConfig`) is taken
    verbatim, so ``optim.schedule=constant`` and ``optim.schedule="constant"`` mean the same.
    """
    if "=" not in text:
        raise ConfigError("", f"override {text!r} is not of the form section.key=value")
    key, raw = (part.strip() for part in text.split("=", 1))
    path = key.split(".")
    if not all(path):
        raise ConfigError("", f"override {text!r} has an empty key")
    tp = _field_type(path, cls)
    try:
        return path, tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        if _is_string_field(tp) or tp is Any:
            return path, raw
        raise ConfigError(
            key, f"got {raw!r}, which is not a TOML value; expected {_type_name(tp)}"
        ) from None


def _set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for key in path[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(".".join(path), "its parent is not a table")
    node[path[-1]] = value


def load_config(
    path: str | Path | None = None, overrides: list[str] = (), cls: type | None = None
) -> Any:
    """Load a :class:`RunConfig` (or another validated config dataclass ``cls``, e.g.
    :class:`moealign.roma.RomaConfig`) from a TOML file, or from a ``.json`` file such as a run
    directory's recorded ``config.json`` (None = all defaults), plus overrides.

    ``overrides`` are ``"section.key=value"`` strings applied in order after the file.
    """
    cls = RunConfig if cls is None else cls
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as handle:
                data = json.load(handle) if Path(path).suffix == ".json" else tomllib.load(handle)
        except FileNotFoundError:
            raise ConfigError("", f"config file {str(path)!r} does not exist") from None
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
            kind = "JSON" if Path(path).suffix == ".json" else "TOML"
            raise ConfigError("", f"config file {str(path)!r} is not valid {kind}: {err}") from None
    for text in overrides:
        key_path, value = parse_override(text, cls)
        _set_path(data, key_path, value)
    return build_config(cls, data)
