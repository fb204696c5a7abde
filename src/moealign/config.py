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

Validation is building (torchtitan/OLMo-core style): each section that makes a component has a
``build()`` (``ModelConfig.build`` → the model, ``OptimConfig.build`` → optimizer and
learning-rate schedule, ``AlignmentConfig.build`` → the alignment term, ``GuardrailConfig.build``
→ the guardrail), and loading a config builds the cheap ones — the routers on the ``meta``
device, the optimizer over a stand-in module, the schedules and the guardrail — so that a
nested option table (``model.router_options``, ``optim.options``) is checked by the code that
will receive it, options added to a router or an optimizer later included. This module imports
no torch at import time (``moealign --help`` stays fast); building imports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import sys
import types
import typing
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from moealign.progress import note

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

__all__ = [
    "AlignmentConfig",
    "COMPRESSION_METHODS",
    "CompressionConfig",
    "ConfigError",
    "GuardrailConfig",
    "DataConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "build_config",
    "check_run_name",
    "load_config",
    "meta_device",
    "parse_override",
    "read_toml",
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

    def describe(self, noun: str = "a finite number") -> str:
        parts = [
            f"{op} {bound if isinstance(bound, int) else format(bound, 'g')}"
            for op, bound in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
            if bound is not None
        ]
        return f"{noun} " + " and ".join(parts)


# Upper bounds of the sizes, counts and rates a config accepts: far above any run this library
# is meant for, low enough that a typo (an extra zero, 1e20) is refused before it allocates
# or loops for hours. Every numeric field has one (tests/test_bad_inputs_config.py checks).
MAX_VOCAB = 2**21
MAX_WIDTH = 2**20
MAX_SEQ_LEN = 2**20
MAX_EXPERTS = 2**14
MAX_STEPS = 10**9
MAX_BATCH = 2**16
MAX_EXAMPLES = 200_000
MAX_EVAL_BATCHES = 10_000
MAX_LR = 1e4
MAX_COEF = 1e3
MAX_CALIBRATION_TOKENS = 2**24


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
            noun = "an integer" if isinstance(number, int) else "a finite number"
            raise ConfigError(name, f"got {value!r}; expected {bounds.describe(noun)}")


class _Validated:
    """Mixin: on construction check each field's type and declared bounds."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = _coerce(getattr(self, f.name), hints[f.name], f.name)
            object.__setattr__(self, f.name, value)
            if "bounds" in f.metadata:
                _check_bounds(f.name, value, f.metadata["bounds"])


@contextlib.contextmanager
def meta_device() -> Iterator[None]:
    """Build modules on the ``meta`` device: shapes and every constructor check, no memory.

    In-place initialisers (``nn.init.normal_``, ``fill_``, ...) on meta tensors are skipped:
    they change no shape, and torch's meta kernels for random fills are slow to load.
    """
    import torch
    from torch.overrides import TorchFunctionMode

    class SkipMetaInit(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = getattr(func, "__name__", "")
            target = args[0] if args else kwargs.get("tensor")
            in_place = name.endswith("_") and not name.endswith("__") and name != "resize_"
            if in_place and isinstance(target, torch.Tensor) and target.is_meta:
                return target
            return func(*args, **kwargs)

    with torch.device("meta"), SkipMetaInit():
        yield


def _keyword_options(cls: type, base: type) -> dict[str, tuple[Any, Any]]:
    """name → (type hint, default) of the keyword-only constructor parameters of ``cls`` and of
    its bases up to ``base`` (the options a component accepts, read from its signature)."""
    options: dict[str, tuple[Any, Any]] = {}
    for klass in reversed(cls.__mro__):
        if not (isinstance(klass, type) and issubclass(klass, base)) or "__init__" not in vars(
            klass
        ):
            continue
        init = vars(klass)["__init__"]
        hints = typing.get_type_hints(init)
        for name, parameter in inspect.signature(init).parameters.items():
            if parameter.kind is inspect.Parameter.KEYWORD_ONLY:
                options[name] = (hints.get(name, Any), parameter.default)
    return options


@dataclass
class ModelConfig(_Validated):
    """Architecture of :class:`moealign.nn.transformer.MoETransformer` (DESIGN.md §2–3).

    ``ffn``: ``moe`` or ``dense``; every ``moe_every``-th layer is MoE. ``router``: a kind of
    :data:`moealign.nn.routers.ROUTER_KINDS`; ``router_options``: the keyword options of that
    router's constructor (checked against its signature and built at load). ``n_layers`` is
    capped at 1024 (a sanity bound far above any public MoE) so that a memory estimate can
    build the model's shapes before anything is allocated.

    Attributes:
        vocab_size: token ids of the embedding and output head (taken from an ``hf:`` tokenizer).
        d_model: width of the residual stream.
        n_layers: transformer blocks.
        n_heads: attention heads; d_model / n_heads must be even (rotary pairs).
        max_seq_len: longest sequence the model accepts; train.seq_len must not exceed it.
        ffn: feed-forward kind of the blocks: ``moe`` or ``dense``.
        d_ff: hidden width of a dense FFN (dense layers and the dense baseline).
        n_experts: experts E per MoE layer (router rows per MoE layer).
        top_k: experts K each token is routed to (at most n_experts).
        expert_d_ff: hidden width F of each expert.
        merged_experts: a merged model's expert count E′ < n_experts (None by default): router
            mapping R2 (:mod:`moealign.compression.plan`): each MoE layer keeps its n_experts
            router rows and runs E′ experts, row e sending its gate to expert expert_map[e] (a
            per-layer buffer in the state dict).
        moe_every: every n-th block is MoE (1 = all; the others are dense).
        shared_d_ff: hidden width of an always-on shared expert (0 = none).
        router: router kind: softmax_topk, switch, hierarchical or mpi (DESIGN.md §3).
        router_options: keyword options of the router's constructor (temperature, c_prime, ...).
        balance_scope: what the balance loss averages over: batch, sequence or global.
        experts_implementation: expert dispatch: auto, grouped_mm or the per-expert loop.
        tie_embeddings: share the input embedding with the output head.
        rope_theta: base of the rotary position embedding's frequencies.
        norm_eps: epsilon of the RMSNorm layers.
        init_std: standard deviation of the embedding and attention initialisation.
    """

    vocab_size: int = bounded(512, ge=1, le=MAX_VOCAB)
    d_model: int = bounded(128, ge=1, le=MAX_WIDTH)
    n_layers: int = bounded(4, ge=1, le=1024)
    n_heads: int = bounded(4, ge=1, le=1024)
    max_seq_len: int = bounded(256, ge=1, le=MAX_SEQ_LEN)
    ffn: str = "moe"
    d_ff: int = bounded(
        512, ge=1, le=MAX_WIDTH
    )  # dense FFN hidden width (dense layers and the dense baseline)
    n_experts: int = bounded(8, ge=1, le=MAX_EXPERTS)
    top_k: int = bounded(2, ge=1, le=MAX_EXPERTS)
    expert_d_ff: int = bounded(128, ge=1, le=MAX_WIDTH)
    merged_experts: int | None = bounded(None, ge=1, le=MAX_EXPERTS)
    moe_every: int = bounded(1, ge=1, le=1024)  # every n-th layer is MoE (1 = all)
    shared_d_ff: int = bounded(
        0, ge=0, le=MAX_WIDTH
    )  # width of an always-on shared expert; 0 = none
    router: str = "softmax_topk"
    router_options: dict[str, Any] = field(default_factory=dict)
    balance_scope: str = "batch"
    experts_implementation: str = "auto"
    tie_embeddings: bool = True
    rope_theta: float = bounded(10000.0, gt=0, le=1e12)
    norm_eps: float = bounded(1e-6, gt=0, le=1)
    init_std: float = bounded(0.02, gt=0, le=10)

    @staticmethod
    def choices() -> dict[str, tuple[str, ...]]:
        """The accepted values of the string fields that name a component, read from the
        components' own registries (so a new router kind is accepted without a change here)."""
        from moealign.nn.experts import EXPERT_IMPLEMENTATIONS
        from moealign.nn.losses import BALANCE_SCOPES
        from moealign.nn.routers import ROUTER_KINDS
        from moealign.nn.transformer import FFN_KINDS

        return {
            "ffn": FFN_KINDS,
            "router": ROUTER_KINDS,
            "balance_scope": BALANCE_SCOPES,
            "experts_implementation": EXPERT_IMPLEMENTATIONS,
        }

    def validate(self) -> ModelConfig:
        """Check the choices and the router options by building one router on the meta device;
        raise :class:`ConfigError` naming the field (relative to the ``model`` section)."""
        for name, accepted in self.choices().items():
            value = getattr(self, name)
            if value not in accepted:
                raise ConfigError(name, f"got {value!r}; expected one of {accepted}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ConfigError(
                "n_heads",
                f"got {self.n_heads}; d_model={self.d_model} must split into heads of even "
                "width (rotary embeddings rotate pairs)",
            )
        if self.top_k > self.n_experts:
            raise ConfigError("top_k", f"got {self.top_k}; expected <= n_experts={self.n_experts}")
        if self.merged_experts is not None and self.merged_experts > self.n_experts:
            raise ConfigError(
                "merged_experts",
                f"got {self.merged_experts}; expected None or <= n_experts={self.n_experts}",
            )
        if self.ffn == "moe" and self.moe_every > self.n_layers:
            raise ConfigError(
                "moe_every",
                f"got {self.moe_every} with n_layers={self.n_layers} and ffn='moe': no layer "
                f"would be MoE; expected <= n_layers (or ffn='dense')",
            )
        self.router_options = self._checked_router_options()
        return self

    def _checked_router_options(self) -> dict[str, Any]:
        from moealign.nn.routers import ROUTER_CLASSES, OptionError, Router, build_router

        accepted = _keyword_options(ROUTER_CLASSES[self.router], Router)
        options = {}
        for key, value in self.router_options.items():
            if key not in accepted:
                raise ConfigError(
                    f"router_options.{key}",
                    f"unknown option of router={self.router!r}; accepted: "
                    f"{', '.join(sorted(accepted))}",
                )
            options[key] = _coerce(value, accepted[key][0], f"router_options.{key}")
        try:
            with meta_device():
                build_router(self.router, self.d_model, self.n_experts, self.top_k, **options)
        except OptionError as err:
            where = (
                err.option
                if err.option in ("top_k", "n_experts", "d_model")
                else (f"router_options.{err.option}")
            )
            raise ConfigError(
                where, f"got {err.value!r}; expected {err.accepted} (router={self.router!r})"
            ) from None
        except (ValueError, TypeError) as err:
            raise ConfigError("router_options", str(err)) from None
        return options

    def is_moe_layer(self, index: int) -> bool:
        return self.ffn == "moe" and index % self.moe_every == self.moe_every - 1

    @property
    def n_moe_layers(self) -> int:
        return sum(self.is_moe_layer(index) for index in range(self.n_layers))

    def dense_matched(self) -> ModelConfig:
        """The dense baseline whose FFN matches this MoE's active FFN width: K·F (+ shared)."""
        return dataclasses.replace(
            self, ffn="dense", d_ff=self.top_k * self.expert_d_ff + self.shared_d_ff
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def build(self, device: Any = None) -> Any:
        """The :class:`moealign.nn.transformer.MoETransformer` of this config (on ``device``)."""
        from moealign.nn.transformer import MoETransformer

        model = MoETransformer(self)
        return model if device is None else model.to(device)


# Local data files that data.source = "hf" reads, by suffix: the datasets builder for each
# (a .txt file is read by paragraphs: blank lines separate its documents).
HF_FILE_KINDS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
}


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
    cached in ``cache_dir``), or ``hf:PATH`` (``AutoTokenizer.from_pretrained(PATH)``, a local
    directory or a hub name; ``model.vocab_size`` is then taken from it).

    ``source = "hf"`` reads text with ``datasets.load_dataset``: ``hf_dataset`` (a dataset
    name, with its configuration ``hf_config``) or local ``paths`` (``.json``/``.jsonl``,
    ``.csv``, ``.parquet`` or ``.txt`` files of one kind, the split "train"; a ``.txt``
    file's paragraphs, separated by blank lines, are its documents, in column ``text``), the
    ``text_column`` of split ``hf_split`` (any ``datasets`` split expression, e.g.
    ``train[:90%]``), the documents in order up to ``text_max_bytes``. Validation documents
    come from ``hf_val_split`` (e.g. ``validation`` or ``train[90%:]``), or when it is empty
    from a deterministic document-level split of ``hf_split``. ``hf_streaming`` reads the rows
    as a stream (for sets too large to download whole), stopping at ``text_max_bytes``.
    Datasets are cached under ``cache_dir``/datasets.

    Attributes:
        source: what to train on: tasks, text, mixed, files or hf.
        tokenizer: ``byte``, ``bpe`` or ``hf:PATH`` (a transformers tokenizer).
        vocab_size: ids of the ``bpe`` tokenizer trained on the text.
        tasks: task families of the suite to use (empty = all).
        heldout_tasks: tasks kept out of training (none = the suite's defaults).
        heldout_compositions: compositions kept out of training (none = the suite's defaults).
        examples_per_task: examples generated per task (split 70/15/15).
        loss_on: task loss on the ``answer`` tokens only, or on ``all`` tokens.
        format: task prompts ``plain``, or ``multiple_choice`` with lettered options.
        n_options: options per question of the multiple-choice format.
        text_max_bytes: text read at most (documents in order while they fit).
        text_to_task_ratio: text batches per task batch for source ``mixed``.
        paths: local files: .txt/.jsonl for ``files`` (at least one);
            .json/.jsonl/.csv/.parquet/.txt of one kind for ``hf``.
        hf_dataset: a ``datasets`` name for source ``hf`` (exactly one of it and paths).
        hf_config: the configuration name of hf_dataset.
        hf_split: the training split (any ``datasets`` split expression).
        hf_val_split: the validation split ("" = a document-level split of hf_split).
        hf_streaming: stream the rows instead of downloading the set whole.
        text_column: the column holding the text (source ``hf``).
        cache_dir: folder of the BPE tokenizer and ``datasets`` caches.
        seed: seed of the task data, the document split and the batch order.
    """

    source: Literal["tasks", "text", "mixed", "files", "hf"] = "mixed"
    tokenizer: str = "byte"
    vocab_size: int = bounded(4096, ge=258, le=MAX_VOCAB)
    tasks: tuple[str, ...] = ()
    heldout_tasks: tuple[str, ...] | None = None
    heldout_compositions: tuple[str, ...] | None = None
    examples_per_task: int = bounded(1000, ge=10, le=MAX_EXAMPLES)
    loss_on: Literal["answer", "all"] = "answer"
    format: Literal["plain", "multiple_choice"] = "plain"
    n_options: int = bounded(4, ge=2, le=26)
    text_max_bytes: int = bounded(2_000_000, ge=1000, le=2**40)
    text_to_task_ratio: float = bounded(1.0, gt=0, le=1000)
    paths: tuple[str, ...] = ()
    hf_dataset: str = ""
    hf_config: str = ""
    hf_split: str = "train"
    hf_val_split: str = ""
    hf_streaming: bool = False
    text_column: str = "text"
    cache_dir: str = ".cache/moealign"
    seed: int = bounded(0, ge=0, lt=2**32)  # the range NumPy seeds accept

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.source == "files" and not self.paths:
            raise ConfigError("paths", "got (); expected at least one path when source='files'")
        if self.tokenizer not in ("byte", "bpe") and not (
            self.tokenizer.startswith("hf:") and self.tokenizer[3:].strip()
        ):
            raise ConfigError(
                "tokenizer",
                f"got {self.tokenizer!r}; expected 'byte', 'bpe' or 'hf:PATH' (a Hugging Face "
                "tokenizer directory or name)",
            )
        if self.source == "hf":
            self._check_hf_source()

    def _check_hf_source(self) -> None:
        if bool(self.hf_dataset) == bool(self.paths):
            raise ConfigError(
                "hf_dataset",
                f"got hf_dataset={self.hf_dataset!r} and paths={list(self.paths)}; with "
                "source='hf' expected exactly one: a datasets name or local data files",
            )
        kinds = {HF_FILE_KINDS.get(Path(path).suffix.lower()) for path in self.paths}
        if None in kinds or len(kinds) > 1:
            raise ConfigError(
                "paths",
                f"got {list(self.paths)}; with source='hf' expected files of one kind: "
                ".json/.jsonl, .csv, .parquet or .txt",
            )
        for name in ("hf_split", "text_column"):
            if not getattr(self, name).strip():
                raise ConfigError(name, "got ''; expected a non-empty name")

    @property
    def hf_builder(self) -> str:
        """What ``datasets.load_dataset`` loads: ``hf_dataset``, or the packaged builder of the
        local ``paths`` (``json``, ``csv`` or ``parquet``)."""
        if self.hf_dataset:
            return self.hf_dataset
        return HF_FILE_KINDS[Path(self.paths[0]).suffix.lower()]


@dataclass
class OptimConfig(_Validated):
    """Optimizer and learning-rate schedule (DESIGN.md §6).

    lr(t) = lr · m(t) with the warm-up + cosine multiplier of
    :class:`moealign.optim.schedules.WarmupCosine`. ``matrix_lr`` (None = ``lr``) is the learning
    rate of the matrix optimizer for Muon/MuonH/AdamH; ``options`` go to
    :func:`moealign.optim.build_optimizer` unchanged. ``grad_clip`` 0 disables clipping.
    A ``warmup_steps`` above ``train.steps`` is clamped to ``train.steps`` (the run's config
    records it; a ``note:`` line on stderr says so).

    Attributes:
        name: optimizer: adamw, muon, adamh or muonh (DESIGN.md §6).
        lr: peak learning rate.
        weight_decay: decoupled weight decay.
        betas: Adam's (β₁, β₂).
        grad_clip: clip the global gradient norm to this (0 = no clipping).
        warmup_steps: linear warm-up steps of the learning rate (clamped to train.steps).
        schedule: after warm-up: ``cosine`` decay or ``constant``.
        min_lr_ratio: the cosine schedule's final lr as a fraction of lr.
        matrix_lr: learning rate of the matrix optimizer (none = lr).
        options: further keyword options of the optimizer (e.g. bias_correction).
    """

    name: Literal["adamw", "muon", "adamh", "muonh"] = "adamw"
    lr: float = bounded(3e-3, gt=0, le=MAX_LR)
    weight_decay: float = bounded(0.1, ge=0, le=10)
    betas: tuple[float, float] = bounded((0.9, 0.95), ge=0, lt=1)
    grad_clip: float = bounded(1.0, ge=0, le=1e6)
    warmup_steps: int = bounded(10, ge=0, le=MAX_STEPS)
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = bounded(0.1, ge=0, le=1)
    matrix_lr: float | None = bounded(None, gt=0, le=MAX_LR)
    options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> OptimConfig:
        """Build the optimizer over a small stand-in module (every parameter group kind: an
        embedding, a matrix, a 3-D expert tensor, a gain) and the schedule: a bad option name,
        type or value is a :class:`ConfigError` naming ``options.<key>``."""
        import torch
        from torch import nn

        from moealign.optim.optimizers import ACCEPTED_OPTIONS

        accepted = ACCEPTED_OPTIONS[self.name]
        for key in self.options:
            if key not in accepted:
                raise ConfigError(
                    f"options.{key}",
                    f"unknown option of name={self.name!r}; accepted: {', '.join(accepted)}",
                )
        with torch.random.fork_rng(devices=[]):  # the stand-in's draws do not count
            stand_in = nn.ModuleDict({"embed": nn.Embedding(4, 4), "proj": nn.Linear(4, 4)})
            stand_in.register_parameter("experts", nn.Parameter(torch.randn(2, 4, 4)))
        try:
            self.build(stand_in, total_steps=max(1, self.warmup_steps))
        except (ValueError, TypeError) as err:
            message = str(err)
            key = next((k for k in self.options if message.startswith(f"{k}=")), None)
            where = f"options.{key}" if key else "options"
            raise ConfigError(where, f"{message} (name={self.name!r})") from None
        return self

    def build(self, model: Any, total_steps: int) -> tuple[Any, Any]:
        """(optimizer, learning-rate scheduler) for ``model`` over ``total_steps`` steps:
        :func:`moealign.optim.build_optimizer` with the DESIGN.md §6 groups and a
        ``LambdaLR`` of :class:`moealign.optim.schedules.WarmupCosine`."""
        import torch

        from moealign.optim.optimizers import build_optimizer
        from moealign.optim.schedules import WarmupCosine

        schedule = WarmupCosine(
            warmup_steps=self.warmup_steps,
            total_steps=total_steps,
            min_lr_ratio=self.min_lr_ratio,
            schedule=self.schedule,
        )
        optimizer = build_optimizer(
            model,
            name=self.name,
            lr=self.lr,
            weight_decay=self.weight_decay,
            betas=self.betas,
            matrix_lr=self.matrix_lr,
            **self.options,
        )
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


@dataclass
class LossConfig(_Validated):
    """Coefficients of the auxiliary router losses (DESIGN.md §4).

    L_total = L_lm + balance_coef · mean_l L_bal,l + z_coef · mean_l L_z,l (+ plugged-in terms).

    Attributes:
        balance_coef: α, the weight of the load-balance loss.
        z_coef: β, the weight of the router z-loss.
    """

    balance_coef: float = bounded(1e-2, ge=0, le=MAX_COEF)
    z_coef: float = bounded(1e-3, ge=0, le=MAX_COEF)


@dataclass
class AlignmentConfig(_Validated):
    """Routing manifold alignment during training (DESIGN.md §4; :mod:`moealign.alignment.term`).

    L_total += λ(t) · mean_τ Σ_l KL(p_l(·|τ) ‖ q_l). ``schedule``: ``none`` (off), ``fixed``,
    ``warmup`` (λ_target·min(1, t/warmup_steps)) or ``warmup_anneal`` (then linear to
    ``lambda_final`` over ``anneal_steps`` from ``anneal_start``). ``prior``: ``uniform``,
    ``marginal`` (EMA of the all-task routing with decay ``prior_decay``) or ``file``
    (safetensors ``prior_path`` holding an (L, E) tensor ``prior``).

    Attributes:
        schedule: λ(t): none (off), fixed, warmup or warmup_anneal (not none: model.ffn = moe).
        lambda_target: λ after the warm-up (the guide's range 0.1–0.5).
        lambda_final: λ at the end of the anneal (warmup_anneal).
        warmup_steps: steps of the linear λ warm-up.
        anneal_start: step where the anneal to lambda_final starts.
        anneal_steps: steps of the linear anneal.
        prior: the routing prior q_l: uniform, marginal (EMA) or file.
        prior_decay: EMA decay of the marginal prior.
        prior_path: safetensors file holding ``prior`` of shape (MoE layers, experts); required
            with prior = file.
    """

    schedule: Literal["none", "fixed", "warmup", "warmup_anneal"] = "none"
    lambda_target: float = bounded(0.1, ge=0, le=MAX_COEF)
    lambda_final: float = bounded(0.0, ge=0, le=MAX_COEF)
    warmup_steps: int = bounded(0, ge=0, le=MAX_STEPS)
    anneal_start: int = bounded(0, ge=0, le=MAX_STEPS)
    anneal_steps: int = bounded(0, ge=0, le=MAX_STEPS)
    prior: Literal["uniform", "marginal", "file"] = "uniform"
    prior_decay: float = bounded(0.99, ge=0, lt=1)
    prior_path: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prior == "file" and not self.prior_path:
            raise ConfigError(
                "prior_path",
                "is empty; expected the path of a safetensors file holding a tensor 'prior' of "
                "shape (MoE layers, n_experts) when prior='file'",
            )

    def validate(self) -> AlignmentConfig:
        """Build the λ schedule and the term (with a uniform stand-in for a prior file, which the
        run's preflight reads), so that e.g. ``anneal_start < warmup_steps`` fails at load."""
        stand_in = dataclasses.replace(self, prior="uniform", prior_path="")
        with meta_device():
            stand_in.build(n_layers=1, n_experts=1)
        return self

    def build(self, n_layers: int, n_experts: int) -> Any:
        """The alignment term (:class:`moealign.alignment.term.RoutingAlignment`) for
        ``n_layers`` MoE layers of ``n_experts`` experts; None when ``schedule = "none"``. A
        ``file`` prior is read and checked here."""
        from moealign.alignment.term import build_alignment

        return build_alignment(self, n_layers, n_experts)


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
    ``cooldown`` steps. Every trigger is an ``event`` record in ``metrics.jsonl``. With
    ``grad_spike_factor`` > 1 (0 = off) a layer whose router gradient norm exceeds that factor
    times the median of its last ``grad_spike_window`` steps is unhealthy too.

    Attributes:
        policy: what a routing collapse triggers: off, reduce_lambda, entropy_bonus, slow_warmup,
            stop.
        min_usage_entropy: a layer below this normalised usage entropy is unhealthy.
        min_token_entropy: a layer below this mean normalised token entropy is unhealthy.
        max_dead_fraction: a layer above this share of dead experts is unhealthy.
        patience: unhealthy steps in a row before the policy acts.
        cooldown: steps to wait after an action.
        factor: reduce_lambda: λ ← factor·λ; slow_warmup: warm-up stretched by 1/factor.
        entropy_bonus: entropy_bonus: added to the bonus weight γ per action.
        grad_spike_factor: a router gradient norm above this × its recent median is unhealthy
            (0 = off, else > 1).
        grad_spike_window: steps whose median the gradient spike check uses.
    """

    policy: Literal["off", "reduce_lambda", "entropy_bonus", "slow_warmup", "stop"] = "off"
    min_usage_entropy: float = bounded(0.5, ge=0, le=1)
    min_token_entropy: float = bounded(0.0, ge=0, le=1)
    max_dead_fraction: float = bounded(0.5, ge=0, le=1)
    patience: int = bounded(3, ge=1, le=MAX_STEPS)
    cooldown: int = bounded(20, ge=0, le=MAX_STEPS)
    factor: float = bounded(0.5, gt=0, lt=1)
    entropy_bonus: float = bounded(0.01, gt=0, le=MAX_COEF)
    grad_spike_factor: float = bounded(0.0, ge=0, le=1e6)
    grad_spike_window: int = bounded(20, ge=2, le=MAX_STEPS)

    def __post_init__(self) -> None:
        super().__post_init__()
        if 0 < self.grad_spike_factor <= 1:
            raise ConfigError(
                "grad_spike_factor",
                f"got {self.grad_spike_factor!r}; expected 0 (off) or a factor > 1",
            )

    def build(self, n_experts: int, alignment: Any = None) -> Any:
        """The :class:`moealign.alignment.guardrails.RoutingGuardrail` watching ``n_experts``
        experts and acting on ``alignment`` (the alignment term, or None)."""
        from moealign.alignment.guardrails import RoutingGuardrail

        return RoutingGuardrail(self, n_experts, alignment)


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
    ``on_nonfinite``: what a step with a non-finite loss or gradient does: ``stop`` (end the
    run there, an error) or ``skip`` (no optimizer step; the run goes on); either way the step
    is an ``event`` in ``metrics.jsonl`` and no checkpoint ever holds a non-finite value.
    ``activation_checkpointing``: ``none``, ``full`` (each block's forward is recomputed in the
    backward pass) or ``moe`` (only each MoE FFN is; :mod:`moealign.nn.checkpointing`): less
    activation memory for more compute, the same gradients. ``compile``: ``torch.compile`` each
    block (:mod:`moealign.nn.compile`); the preflight checks that the compiler runs here.

    Attributes:
        steps: optimizer steps of the run.
        batch_size: sequences per optimizer step over all ranks.
        grad_accum: micro-batches per rank and step (divides batch_size).
        seq_len: tokens per training sequence (at most model.max_seq_len).
        eval_every: validation every this many steps (0 = only at the end).
        eval_batches: validation batches per evaluation.
        log_every: a training record in metrics.jsonl every this many steps.
        checkpoint_every: a checkpoint every this many steps (0 = only at the end).
        keep_checkpoints: newest checkpoints kept on disk.
        task_eval_examples: examples per task answered in the final evaluation (0 = skip).
        seed: seed of the model initialisation and the training randomness.
        device: auto (CUDA when present), cpu or cuda.
        precision: fp32, bf16 autocast, or auto (bf16 on a CUDA device that supports it).
        tensorboard: mirror metrics.jsonl to TensorBoard (<run>/tensorboard).
        wandb: mirror metrics.jsonl to offline W&B (<run>/wandb).
        parallel: how torchrun ranks share the model: ddp, fsdp (optim.name = adamw) or ep
            (model.ffn = moe).
        ep_size: ranks the experts are split over (> 1 only with parallel = ep; divides
            model.n_experts).
        on_nonfinite: a non-finite loss or gradient: ``stop`` the run or ``skip`` the step.
        activation_checkpointing: recompute activations in backward: none, full or moe.
        compile: ``torch.compile`` each block (the preflight checks the compiler).
    """

    steps: int = bounded(100, ge=1, le=MAX_STEPS)
    batch_size: int = bounded(8, ge=1, le=MAX_BATCH)
    grad_accum: int = bounded(1, ge=1, le=MAX_BATCH)
    seq_len: int = bounded(128, ge=2, le=MAX_SEQ_LEN)  # the task suite's longest example fits
    eval_every: int = bounded(50, ge=0, le=MAX_STEPS)
    eval_batches: int = bounded(4, ge=1, le=MAX_EVAL_BATCHES)
    log_every: int = bounded(10, ge=1, le=MAX_STEPS)
    checkpoint_every: int = bounded(50, ge=0, le=MAX_STEPS)
    keep_checkpoints: int = bounded(3, ge=1, le=10_000)
    task_eval_examples: int = bounded(50, ge=0, le=MAX_EXAMPLES)
    seed: int = bounded(0, ge=0, lt=2**32)  # the range NumPy seeds accept
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    tensorboard: bool = False
    wandb: bool = False
    parallel: Literal["ddp", "fsdp", "ep"] = "ddp"
    ep_size: int = bounded(1, ge=1, le=MAX_EXPERTS)
    on_nonfinite: Literal["stop", "skip"] = "stop"
    activation_checkpointing: Literal["none", "full", "moe"] = "none"
    compile: bool = False

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
    directory, its ``source_n_experts`` E, the ``keep_experts`` E′ (``model.n_experts`` after
    pruning, ``model.merged_experts`` after merging), the ``calibration`` data (``training
    data`` or a file) and its ``calibration_tokens``, the ``seed`` and the Sub-MoE joint-SVD
    ``rank`` (None = the default truncation of
    :func:`moealign.compression.submoe.default_rank`). Recorded in ``config.json`` only when
    ``method`` is not ``none``.

    Attributes:
        method: how the weights were compressed (none for an ordinary run).
        source: the compressed run directory or model.
        source_n_experts: E, the experts per layer before compression.
        keep_experts: E′, the experts kept (model.n_experts after pruning,
            model.merged_experts after merging).
        calibration: the calibration data ("training data" or a file).
        calibration_tokens: calibration tokens used.
        seed: seed of the compression method.
        rank: Sub-MoE joint-SVD rank (none = the default truncation, floor(d_out·d_in /
            (d_out + d_in)); a rank at or above the matrices' rank = full rank).
    """

    method: Literal["none", "frequency", "naee", "msmoe", "submoe"] = "none"
    source: str = ""
    source_n_experts: int = bounded(0, ge=0, le=MAX_EXPERTS)
    keep_experts: int = bounded(0, ge=0, le=MAX_EXPERTS)
    calibration: str = ""
    calibration_tokens: int = bounded(0, ge=0, le=MAX_CALIBRATION_TOKENS)
    seed: int = bounded(0, ge=0, lt=2**32)
    rank: int | None = bounded(None, ge=1, le=MAX_WIDTH)


@dataclass
class RunConfig(_Validated):
    """Everything that defines a run; ``to_dict()`` is what the run directory records.

    Attributes:
        model: the architecture.
        data: the training data.
        optim: optimizer and learning-rate schedule.
        loss: auxiliary router loss weights.
        alignment: routing alignment.
        guardrails: routing-collapse guardrails.
        train: the training loop.
        compression: how ``moealign compress`` made the weights (compressed runs only).
        name: the run's folder name under out_dir.
        out_dir: the folder holding runs.
    """

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
        check_run_name(self.name)
        if not self.out_dir or "\0" in self.out_dir:
            raise ConfigError("out_dir", f"got {self.out_dir!r}; expected a folder path")
        if self.data.tokenizer.startswith("hf:"):  # the model's vocabulary is the tokenizer's
            from moealign.data.tokenizer import load_transformers_tokenizer

            try:
                tokenizer = load_transformers_tokenizer(self.data.tokenizer[3:])
            except ValueError as err:
                raise ConfigError("data.tokenizer", str(err)) from None
            self.model.vocab_size = tokenizer.vocab_size
        if self.train.seq_len > self.model.max_seq_len:
            raise ConfigError(
                "train.seq_len",
                f"got {self.train.seq_len}; expected <= model.max_seq_len={self.model.max_seq_len}",
            )
        if self.optim.warmup_steps > self.train.steps:
            # A shortened run (e.g. --set train.steps=40 on a config warming up over 50) keeps
            # the longest warm-up it can: the whole run, the learning rate reaching its peak at
            # the last step. The recorded config holds the value used.
            note(
                f"optim.warmup_steps={self.optim.warmup_steps} > train.steps={self.train.steps}; "
                f"using {self.train.steps}"
            )
            self.optim.warmup_steps = self.train.steps

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
        merged = self.model.merged_experts
        if merged is not None and self.train.ep_size > 1:
            raise ConfigError(
                "train.ep_size",
                f"got {self.train.ep_size}; a merged model (model.merged_experts={merged}) "
                "runs without expert parallelism: expected 1",
            )
        compression = self.compression
        stored = self.model.n_experts if merged is None else merged
        if compression.method != "none" and not (
            compression.keep_experts == stored < compression.source_n_experts
        ):
            field_name = "model.n_experts" if merged is None else "model.merged_experts"
            raise ConfigError(
                "compression.keep_experts",
                f"got {compression.keep_experts}; expected {field_name}="
                f"{stored} < compression.source_n_experts="
                f"{compression.source_n_experts}",
            )

    def validate(self) -> RunConfig:
        """Build what crosses sections: the alignment term for the model's MoE layers (a prior
        file is read by the preflight, :mod:`moealign.training.preflight`) and the guardrail
        acting on it."""
        stand_in = dataclasses.replace(self.alignment, prior="uniform", prior_path="")
        with meta_device():
            alignment = stand_in.build(self.model.n_moe_layers, self.model.n_experts)
        self.guardrails.build(self.model.n_experts, alignment)
        return self

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


_NAME_BYTES = 255  # the longest file name Linux, macOS and Windows file systems accept


def check_run_name(name: str, field: str = "name") -> str:
    """``name`` if it is one plain path component (a run folder directly under ``out_dir``);
    else :class:`ConfigError`: no ``/`` or ``\\``, not ``.``/``..``, no NUL or other control
    character, at most 255 bytes in UTF-8."""
    problem = None
    if not name or not name.strip():
        problem = "it is empty"
    elif name in (".", ".."):
        problem = "it names the folder itself or its parent"
    elif "/" in name or "\\" in name:
        problem = "it holds a path separator"
    elif any(unicodedata.category(c) == "Cc" for c in name):
        problem = "it holds a control character (NUL, newline, U+0085, ...)"
    elif any(0xD800 <= ord(c) <= 0xDFFF for c in name):
        problem = "it holds bytes that are not UTF-8"
    elif len(name.encode("utf-8", "surrogatepass")) > _NAME_BYTES:
        problem = f"it is {len(name.encode('utf-8', 'surrogatepass'))} bytes long"
    if problem:
        shown = name.encode("utf-8", "backslashreplace").decode("utf-8")
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise ConfigError(
            field,
            f"got {shown!r}, but {problem}; expected one plain folder name (no '/', not '.' or "
            f"'..', at most {_NAME_BYTES} bytes), placed under out_dir",
        )
    return name


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
    from moealign.io import MAX_DEPTH, check_depth

    tp = _field_type(path, cls)
    too_deep = ConfigError(key, f"the value is nested more than {MAX_DEPTH} levels deep")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except RecursionError:
        raise too_deep from None
    except tomllib.TOMLDecodeError:
        if _is_string_field(tp) or tp is Any:
            return path, raw
        raise ConfigError(
            key, f"got {raw!r}, which is not a TOML value; expected {_type_name(tp)}"
        ) from None
    try:
        return path, check_depth(value, key)
    except ValueError:
        raise too_deep from None


def _set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for key in path[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(".".join(path), "its parent is not a table")
    node[path[-1]] = value


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """The table in the TOML file ``path``; one :class:`ConfigError` naming ``what`` and the file
    if it is missing, a folder or not a regular file, too large, unreadable, not UTF-8 text, not
    TOML or nested too deeply (:func:`moealign.io.read_bytes`, :func:`moealign.io.check_depth`)."""
    from moealign.io import FileFormatError, check_depth, read_bytes

    shown = repr(str(path))
    if Path(path).is_dir():
        raise ConfigError("", f"{what} {shown} is a folder; expected a TOML file")
    try:
        return check_depth(tomllib.loads(read_bytes(path).decode("utf-8")), f"{what} {shown}")
    except FileNotFoundError:
        raise ConfigError("", f"{what} {shown} does not exist") from None
    except FileFormatError as err:
        reason = str(err).removeprefix(f"{path}: ").removeprefix(f"{what} {shown}: ")
        raise ConfigError("", f"{what} {shown}: {reason}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(
            "", f"{what} {shown} is not UTF-8 text (bad byte at offset {err.start})"
        ) from None
    except tomllib.TOMLDecodeError as err:
        reason = " ".join(str(err).split())
        raise ConfigError("", f"{what} {shown} is not valid TOML: {reason}") from None
    except RecursionError:
        raise ConfigError("", f"{what} {shown} is nested too deeply") from None
    except OSError as err:
        raise ConfigError("", f"{what} {shown} cannot be read: {err.strerror}") from None


def _read_json_config(path: str | Path) -> dict[str, Any]:
    """The table in a run's recorded ``config.json``; one :class:`ConfigError` naming the file
    if it is missing, unreadable or not a JSON object."""
    from moealign.io import read_json

    shown = repr(str(path))
    try:
        data = read_json(path)
    except FileNotFoundError:
        raise ConfigError("", f"config file {shown} does not exist") from None
    except (ValueError, OSError) as err:
        raise ConfigError("", f"config file {shown} cannot be read: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            "", f"config file {shown} holds a JSON {type(data).__name__}; expected a table"
        )
    return data


_WRITTEN_BY_COMPRESS = (
    "is recorded by `moealign compress` in the config.json of the run it writes; not accepted "
    "in a config file or --set (resume a compressed run with --resume --out DIR)"
)


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
    recorded = path is not None and Path(path).suffix == ".json"
    if path is not None:
        data = _read_json_config(path) if recorded else read_toml(path, "config file")
    for text in overrides:
        key_path, value = parse_override(text, cls)
        if cls is RunConfig and key_path[0] == "compression":
            raise ConfigError(".".join(key_path), _WRITTEN_BY_COMPRESS)
        _set_path(data, key_path, value)
    if cls is RunConfig and "compression" in data and not recorded:
        raise ConfigError("compression", _WRITTEN_BY_COMPRESS)
    return build_config(cls, data)
