"""Run configs: TOML loading, --set overrides with type coercion, one clear error per mistake."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

from helpers_cli import CONFIGS, run_cli
from moealign.config import ConfigError, RunConfig, build_config, load_config, parse_override


def test_shipped_configs_load_and_round_trip():
    for name in ("tiny.toml", "default.toml"):
        config = load_config(CONFIGS / name)
        assert build_config(RunConfig, config.to_dict()) == config
    assert load_config(CONFIGS / "tiny.toml").name == "tiny"


def test_overrides_are_coerced_to_the_field_type():
    config = load_config(
        None,
        [
            "model.n_experts=16",
            "optim.lr=1",
            "optim.betas=[0.8, 0.99]",
            "optim.schedule=constant",
            'optim.name="muon"',
            "optim.matrix_lr=0.02",
            "model.router_options={temperature = 0.5}",
            "model.router_options.expert_bias=true",
            "data.tasks=['copy', 'reverse']",
            "train.seq_len=32",
        ],
    )
    assert config.model.n_experts == 16 and type(config.model.n_experts) is int
    assert config.optim.lr == 1.0 and type(config.optim.lr) is float
    assert config.optim.betas == (0.8, 0.99)
    assert config.optim.schedule == "constant" and config.optim.name == "muon"
    assert config.optim.matrix_lr == 0.02
    assert config.model.router_options == {"temperature": 0.5, "expert_bias": True}
    assert config.data.tasks == ("copy", "reverse")
    # a later override wins, and an override applies on top of the file
    config = load_config(CONFIGS / "tiny.toml", ["train.steps=7", "train.steps=9"])
    assert config.train.steps == 9 and config.model.d_model == 32


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("optim.lrr=0.1", ["optim.lrr", "unknown key", "lr", "matrix_lr"]),
        ("trian.steps=3", ["trian", "unknown key", "train"]),
        ("model.n_experts=abc", ["model.n_experts", "'abc'", "integer"]),
        ("model.n_experts=2.5", ["model.n_experts", "2.5", "integer"]),
        ("optim.lr=-1", ["optim.lr", "-1", "> 0"]),
        ("optim.betas=[0.9, 1.5]", ["optim.betas", "1.5", "< 1"]),
        ("optim.betas=[0.9]", ["optim.betas", "array of 2"]),
        ("optim.schedule=linear", ["optim.schedule", "'linear'", "'cosine'", "'constant'"]),
        ("train.device=tpu", ["train.device", "'tpu'", "'cuda'"]),
        ("train.grad_accum=3", ["train.batch_size", "multiple of grad_accum=3"]),
        ("train.seq_len=100000", ["train.seq_len", "100000", "model.max_seq_len"]),
        ("train.resume=true", ["train.resume", "unknown key"]),
        ("loss.balance_coef=true", ["loss.balance_coef", "True", "a number"]),
    ],
)
def test_bad_values_raise_one_error_naming_field_value_and_accepted(override, fragments):
    with pytest.raises(ConfigError) as caught:
        load_config(None, [override])
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_unknown_key_in_a_file_is_reported_with_its_dotted_path(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[optim]\nlr = 0.1\nwarmup = 3\n")
    with pytest.raises(
        ConfigError, match=r"^optim\.warmup: unknown key; accepted keys: .*warmup_steps"
    ):
        load_config(path)
    path.write_text("[optim\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


@dataclass
class _Inner:
    width: int = 4

    def __post_init__(self):
        if self.width % 2:
            raise ValueError(f"width={self.width} must be even")


@dataclass
class _Outer:
    inner: _Inner


def test_value_errors_of_a_section_are_prefixed_with_its_path():
    with pytest.raises(ConfigError, match=r"^block\.inner: width=3 must be even$"):
        build_config(_Outer, {"inner": {"width": 3}}, "block")
    with pytest.raises(ConfigError, match=r"^block.inner.width: got 'x'; expected an integer$"):
        build_config(_Outer, {"inner": {"width": "x"}}, "block")


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("optim.lr")
    assert parse_override("optim.lr=2e-3") == (["optim", "lr"], 2e-3)


def test_cli_config_error_is_one_line_exit_2_without_traceback(tmp_path):
    for override, field in (("optim.lr=-1", "optim.lr"), ("model.nope=1", "model.nope")):
        result = run_cli("train", "--set", override, "--out", str(tmp_path / "run"), cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {field}"), result.stderr
        assert not (tmp_path / "run").exists()


def test_a_router_option_added_later_is_checked_from_its_signature(monkeypatch):
    """A new router kind (or option) needs no change in config.py: its keyword-only
    constructor parameters are the accepted options, typed by their annotations, and its own
    range checks run when the config builds it on the meta device."""
    from moealign.nn import routers

    class SharpRouter(routers.Router):
        kind = "sharp"

        def __init__(self, d_model, n_experts, top_k, *, sharpness: float = 2.0, **options):
            super().__init__(d_model, n_experts, top_k, **options)
            routers._check("sharpness", sharpness, sharpness >= 1, "a float >= 1")

    monkeypatch.setitem(routers.ROUTER_CLASSES, "sharp", SharpRouter)
    monkeypatch.setattr(routers, "ROUTER_KINDS", (*routers.ROUTER_KINDS, "sharp"))
    config = load_config(None, ["model.router=sharp", "model.router_options={sharpness=3}"])
    assert config.model.router_options == {"sharpness": 3.0}  # coerced to the annotation
    for option, fragment in (
        ("{sharpness='x'}", "model.router_options.sharpness: got 'x'; expected a number"),
        ("{sharpness=0.5}", "model.router_options.sharpness: got 0.5; expected a float >= 1"),
        ("{temperature=0.0}", "model.router_options.temperature: got 0.0"),  # inherited
        ("{sharpnes=3}", "model.router_options.sharpnes: unknown option of router='sharp'"),
    ):
        with pytest.raises(ConfigError, match=re.escape(fragment)):
            load_config(None, ["model.router=sharp", f"model.router_options={option}"])


def test_loading_builds_nothing_of_real_size():
    """16384 experts of width 65536 (terabytes) load (on the meta device) in well under the
    memory they need; the preflight is what refuses them (tests/test_bad_inputs_config.py)."""
    config = load_config(None, ["model.n_experts=16384", "model.expert_d_ff=65536"])
    assert config.model.n_experts == 16384


def test_every_numeric_config_field_has_an_upper_bound():
    """The bounded-config rule (issue 23): no size, count, rate or seed without a maximum."""
    import dataclasses
    import typing

    from moealign.config import RunConfig
    from moealign.roma.config import RomaConfig

    sections = [RomaConfig, *typing.get_type_hints(RunConfig).values()]
    unbounded = []
    checked = 0
    for section in sections:
        if not dataclasses.is_dataclass(section):
            continue
        checked += 1
        hints = typing.get_type_hints(section)
        for f in dataclasses.fields(section):
            numbers = {int, float}
            kinds = set(typing.get_args(hints[f.name])) | {hints[f.name]}
            if kinds & numbers or any(set(typing.get_args(k)) & numbers for k in kinds):
                bounds = f.metadata.get("bounds")
                if bounds is None or (bounds.le is None and bounds.lt is None):
                    unbounded.append(f"{section.__name__}.{f.name}")
    assert checked == 9
    assert unbounded == ["RomaConfig.layers"], unbounded  # checked against the model's layers


def test_memory_estimate_counts_parameters_buffers_gradients_and_state():
    from moealign.optim.optimizers import parameter_groups
    from moealign.training.preflight import training_memory_bytes

    for optimizer, matrix_states in (("adamw", 2), ("muon", 1)):
        config = load_config(CONFIGS / "tiny.toml", [f"optim.name={optimizer}"])
        model = config.model.build()  # the real model, counted independently
        matrices, others = parameter_groups(model)
        expected = 4 * (
            sum(p.numel() for p in matrices) * (2 + matrix_states)
            + sum(p.numel() for p in others) * 4
            + sum(b.numel() for b in model.buffers())
        )
        assert training_memory_bytes(config) == expected


def test_moe_layer_count_follows_moe_every():
    config = load_config(None, ["model.n_layers=7", "model.moe_every=3"])
    assert config.model.n_moe_layers == sum(config.model.is_moe_layer(i) for i in range(7)) == 2
