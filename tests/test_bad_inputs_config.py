"""Bad inputs, part 1: configs, ``--set`` values, config files and output paths given to
``moealign train``. Each gives exit 2, one ``error:`` line naming the field or file, no
traceback, and loses nothing on disk (helpers_bad_inputs). The model is never built for real
and no run folder is made: all of these are refused before work starts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from helpers_bad_inputs import (
    NO_CUDA,
    Case,
    check_case,
    check_case_in_subprocess,
    params,
    train_args,
    write,
)


def _folder_with_sources(tmp: Path) -> None:
    """A folder that is not a run: a config.json beside source files (the issue's victim)."""
    (tmp / "src").mkdir()
    (tmp / "src" / "config.json").write_text("{}")
    (tmp / "src" / "main.py").write_text("print('precious')\n")


def _prior(shape: tuple[int, ...]) -> callable:
    def setup(tmp: Path) -> None:
        from safetensors.torch import save_file

        save_file({"prior": torch.full(shape, 1.0 / shape[-1])}, str(tmp / "prior.safetensors"))

    return setup


def _case(id: str, overrides: list[str], *fragments: str, **kwargs) -> Case:
    return Case(id, train_args(*overrides), fragments, **kwargs)


FILE_PRIOR = ["alignment.schedule=fixed", "alignment.prior=file"]

CASES = [
    # ---- run names: one plain folder name under out_dir
    _case("name-dot", ['name="."'], "name", "'.'"),
    _case("name-dotdot", ['name=".."'], "name", "'..'"),
    _case("name-traversal", ['name="../../x"'], "name", "separator"),
    _case("name-absolute", ['name="/tmp/x"'], "name", "separator"),
    _case("name-nul", ['name="a\\u0000b"'], "name", "control character"),
    _case("name-newline", ['name="a\\nb"'], "name", "control character"),
    _case("name-empty", ['name=""'], "name", "empty"),
    _case("name-300-chars", [f'name="{"a" * 300}"'], "name", "300 bytes"),
    _case("out-dir-empty", ['out_dir=""'], "out_dir"),
    # ---- model.router_options, checked against the router kind's constructor
    _case("router-options-bogus", ["model.router_options={bogus=1}"], "router_options.bogus"),
    _case(
        "router-temperature-negative",
        ["model.router_options={temperature=-1.0}"],
        "model.router_options.temperature",
        "-1.0",
    ),
    _case("router-top-k-option", ["model.router_options={top_k=3}"], "router_options.top_k"),
    _case(
        "router-temperature-string",
        ["model.router_options={temperature='hot'}"],
        "router_options.temperature",
        "a number",
    ),
    _case(
        "router-logit-dropout-1.5",
        ["model.router_options={logit_dropout=1.5}"],
        "router_options.logit_dropout",
    ),
    _case(
        "router-capacity-negative",
        ["model.router_options={capacity_factor=-1.0}"],
        "router_options.capacity_factor",
    ),
    _case("router-jitter-2", ["model.router_options={jitter=2.0}"], "router_options.jitter"),
    _case(
        "router-expert-bias-string",
        ["model.router_options={expert_bias='yes'}"],
        "router_options.expert_bias",
    ),
    _case("router-options-not-table", ["model.router_options=3"], "model.router_options"),
    _case("switch-default-top-k", ["model.router=switch"], "model.top_k", "switch"),
    _case(
        "hierarchical-3-groups-of-4",
        ["model.router=hierarchical", "model.router_options={n_groups=3}"],
        "router_options.n_groups",
        "divisor",
    ),
    _case(
        "hierarchical-topk-groups",
        ["model.router=hierarchical", "model.router_options={n_groups=2, topk_groups=3}"],
        "router_options.topk_groups",
    ),
    _case(
        "mpi-c-prime-zero",
        ["model.router=mpi", "model.router_options={c_prime=0.0}"],
        "router_options.c_prime",
    ),
    _case(
        "mpi-power-steps-zero",
        ["model.router=mpi", "model.router_options={power_steps=0}"],
        "router_options.power_steps",
    ),
    _case(
        "mpi-expert-matrix",
        ["model.router=mpi", "model.router_options={expert_matrix='foo'}"],
        "router_options.expert_matrix",
        "'gate'",
    ),
    _case(
        "mpi-option-on-softmax",
        ["model.router_options={c_prime=2.0}"],
        "router_options.c_prime",
        "softmax_topk",
    ),
    # ---- other model fields and numeric bounds
    _case("router-unknown", ["model.router=topk"], "model.router", "'topk'"),
    _case("ffn-unknown", ["model.ffn=sparse"], "model.ffn"),
    _case("top-k-above-experts", ["model.top_k=9"], "model.top_k", "n_experts=4"),
    _case("n-experts-zero", ["model.n_experts=0"], "model.n_experts"),
    _case("n-heads-odd", ["model.n_heads=3"], "model.n_heads"),
    _case("init-std-nan", ["model.init_std=nan"], "model.init_std", "finite"),
    _case("init-std-inf", ["model.init_std=inf"], "model.init_std"),
    _case("norm-eps-negative", ["model.norm_eps=-1.0"], "model.norm_eps", "> 0"),
    _case("rope-theta-zero", ["model.rope_theta=0.0"], "model.rope_theta", "> 0"),
    _case("n-layers-huge", ["model.n_layers=100000"], "model.n_layers", "1024"),
    _case("n-experts-100m", ["model.n_experts=100000000"], "model.n_experts", "16384"),
    _case("vocab-huge", ["model.vocab_size=100000000000"], "model.vocab_size", "2097152"),
    # within every bound, but its parameters alone need terabytes
    _case(
        "experts-too-big-for-memory",
        ["model.n_experts=16384", "model.expert_d_ff=65536", "model.d_model=4096"],
        "model",
        "GiB",
    ),
    _case("balance-scope", ["model.balance_scope=tokens"], "model.balance_scope"),
    _case("experts-impl", ["model.experts_implementation=magic"], "experts_implementation"),
    _case("model-unknown-key", ["model.nope=1"], "model.nope", "unknown key"),
    # ---- optim.options, checked against the chosen optimizer
    _case("optim-option-typo", ["optim.options={momentm=0.9}"], "optim.options.momentm"),
    _case(
        "muon-momentum-2",
        ["optim.name=muon", "optim.options={momentum=2.0}"],
        "optim.options.momentum",
    ),
    _case("muon-ns-steps-0", ["optim.name=muon", "optim.options={ns_steps=0}"], "ns_steps"),
    _case("muon-ns-dtype", ["optim.name=muon", "optim.options={ns_dtype='float8'}"], "ns_dtype"),
    _case(
        "adamh-update-constant",
        ["optim.name=adamh", "optim.options={update_constant=-1.0}"],
        "update_constant",
    ),
    _case("adamw-eps-zero", ["optim.options={eps=0.0}"], "optim.options"),
    _case("muon-option-on-adamw", ["optim.options={ns_steps=5}"], "optim.options.ns_steps"),
    _case("lr-negative", ["optim.lr=-1"], "optim.lr"),
    _case("lr-nan", ["optim.lr=nan"], "optim.lr", "finite"),
    _case("betas-above-one", ["optim.betas=[0.9, 1.5]"], "optim.betas"),
    _case("betas-one-value", ["optim.betas=[0.9]"], "optim.betas"),
    _case("schedule-unknown", ["optim.schedule=linear"], "optim.schedule"),
    _case("optimizer-unknown", ["optim.name=sgd"], "optim.name"),
    _case("fsdp-with-muon", ["optim.name=muon", "train.parallel=fsdp"], "optim.name", "fsdp"),
    # ---- alignment and guardrails
    _case(
        "warmup-anneal-default-start",
        ["alignment.schedule=warmup_anneal", "alignment.warmup_steps=10"],
        "alignment.anneal_start",
    ),
    _case("prior-file-no-path", FILE_PRIOR, "alignment.prior_path", "is empty"),
    _case(
        "prior-file-missing",
        [*FILE_PRIOR, 'alignment.prior_path="missing.safetensors"'],
        "alignment.prior_path",
        "missing.safetensors",
    ),
    _case(
        "prior-file-garbage",
        [*FILE_PRIOR, 'alignment.prior_path="{tmp}/prior.safetensors"'],
        "alignment.prior_path",
        "safetensors",
        setup=write("prior.safetensors", b"\x00garbage" * 10),
    ),
    _case(
        "prior-file-wrong-shape",
        [*FILE_PRIOR, 'alignment.prior_path="{tmp}/prior.safetensors"'],
        "alignment.prior_path",
        "(2, 4)",
        setup=_prior((3, 4)),
    ),
    _case("prior-decay-one", ["alignment.prior_decay=1.0"], "alignment.prior_decay"),
    _case(
        "alignment-on-dense",
        ["alignment.schedule=fixed", "model.ffn=dense"],
        "alignment.schedule",
        "dense",
    ),
    _case("guardrail-without-alignment", ["guardrails.policy=reduce_lambda"], "guardrails.policy"),
    _case("guardrail-factor", ["guardrails.factor=1.5"], "guardrails.factor"),
    _case("guardrail-patience", ["guardrails.patience=0"], "guardrails.patience"),
    # ---- train and data sections
    _case("seed-above-64-bits", ["train.seed=1180591620717411303424"], "train.seed"),
    _case("seed-negative", ["train.seed=-1"], "train.seed"),
    _case("data-seed-2-64", ["data.seed=18446744073709551616"], "data.seed"),
    _case("device-cuda", ["train.device=cuda"], "train.device", "CUDA", skip=NO_CUDA),
    _case("device-tpu", ["train.device=tpu"], "train.device"),
    _case("batch-size-zero", ["train.batch_size=0"], "train.batch_size"),
    _case("grad-accum-not-dividing", ["train.grad_accum=3"], "train.batch_size", "grad_accum"),
    _case("seq-len-above-context", ["train.seq_len=100000"], "train.seq_len"),
    _case("ep-size-without-ep", ["train.ep_size=2"], "train.ep_size"),
    _case("ep-size-not-dividing", ["train.parallel=ep", "train.ep_size=3"], "train.ep_size"),
    _case("eval-batches-zero", ["train.eval_batches=0"], "train.eval_batches"),
    _case("keep-checkpoints-zero", ["train.keep_checkpoints=0"], "train.keep_checkpoints"),
    _case(
        "activation-checkpointing-unknown",
        ["train.activation_checkpointing=selective"],
        "train.activation_checkpointing",
        "'none', 'full', 'moe'",
    ),
    _case("compile-not-a-bool", ['train.compile="yes"'], "train.compile", "true or false"),
    _case("files-without-paths", ["data.source=files"], "data.paths"),
    _case(
        "files-missing",
        ["data.source=files", 'data.paths=["missing.txt"]'],
        "data.paths[0]",
        "missing.txt",
    ),
    _case(
        "files-a-folder",
        ["data.source=files", 'data.paths=["{tmp}"]'],
        "data.paths[0]",
        "folder",
    ),
    _case(
        "cache-dir-a-file",
        ['data.cache_dir="{tmp}/cache"'],
        "data.cache_dir",
        setup=write("cache", "not a folder"),
    ),
    _case(
        "cache-dir-under-a-file",
        ["data.tokenizer=bpe", "data.source=text", 'data.cache_dir="{tmp}/cache/sub"'],
        "data.cache_dir",
        setup=write("cache", "not a folder"),
    ),
    _case("vocab-too-small", ["data.vocab_size=10"], "data.vocab_size"),
    _case("n-options-30", ["data.n_options=30"], "data.n_options"),
    _case("data-loss-on", ["data.loss_on=some"], "data.loss_on"),
    # ---- override syntax
    _case("unknown-section", ["bogus.key=1"], "bogus", "unknown key"),
    Case("override-without-equals", [*train_args(), "--set", "optim.lr"], ("section.key=value",)),
    Case("override-empty-key", [*train_args(), "--set", "=3"], ("empty key",)),
    _case("override-not-toml", ["optim.lr=abc"], "optim.lr", "not a TOML value"),
    _case("override-sub-key-of-value", ["model.d_model.x=1"], "model.d_model", "not a table"),
    _case("override-bool-for-number", ["loss.balance_coef=true"], "loss.balance_coef"),
    # ---- config files
    Case(
        "config-missing",
        ["train", "--config", "{tmp}/missing.toml"],
        ("config file", "missing.toml", "does not exist"),
    ),
    Case("config-a-folder", ["train", "--config", "{tmp}"], ("config file", "is a folder")),
    Case(
        "config-binary",
        ["train", "--config", "{tmp}/c.toml"],
        ("config file", "c.toml"),
        setup=write("c.toml", bytes(range(256))),
    ),
    Case(
        "config-not-utf8",
        ["train", "--config", "{tmp}/c.toml"],
        ("c.toml", "not UTF-8"),
        setup=write("c.toml", 'name = "caf\xe9"\n'.encode("latin-1")),
    ),
    Case(
        "config-bad-toml",
        ["train", "--config", "{tmp}/c.toml"],
        ("c.toml", "not valid TOML"),
        setup=write("c.toml", "[optim\n"),
    ),
    Case(
        "config-nul-byte",
        ["train", "--config", "{tmp}/c.toml"],
        ("c.toml", "not valid TOML"),
        setup=write("c.toml", b'name = "a"\x00\n'),
    ),
    Case(
        "config-unknown-key",
        ["train", "--config", "{tmp}/c.toml"],
        ("optim.warmup", "unknown key"),
        setup=write("c.toml", "[optim]\nwarmup = 3\n"),
    ),
    Case(
        "config-deeply-nested",
        ["train", "--config", "{tmp}/c.toml"],
        ("c.toml",),
        setup=write("c.toml", "x = " + "[" * 5000 + "]" * 5000 + "\n"),
    ),
    # ---- output paths
    Case(
        "out-a-file",
        [*train_args(), "--out", "{tmp}/f"],
        ("--out", "not a folder"),
        setup=write("f", "keep me"),
    ),
    Case("out-dev-null", [*train_args(), "--out", "/dev/null"], ("--out", "/dev/null")),
    Case(
        "out-under-a-file",
        [*train_args(), "--out", "{tmp}/f/run"],
        ("--out", "not a folder"),
        setup=write("f", "keep me"),
    ),
    _case(
        "out-dir-a-file", ['out_dir="{tmp}/f"'], "out_dir", "not a folder", setup=write("f", "x")
    ),
    Case(
        "overwrite-folder-with-sources",
        [*train_args(), "--out", "{tmp}/src", "--overwrite"],
        ("src", "holds no moealign run"),
        setup=_folder_with_sources,
    ),
    Case(
        "new-run-in-folder-with-sources",
        [*train_args(), "--out", "{tmp}/src"],
        ("src", "holds no moealign run"),
        setup=_folder_with_sources,
    ),
    Case(
        "resume-and-overwrite",
        [*train_args(), "--resume", "--overwrite"],
        ("not allowed with argument",),
    ),
    Case(
        "read-only-out",
        [*train_args(), "--out", "{tmp}/ro/run"],
        ("--out", "not writable"),
        setup=lambda tmp: ((tmp / "ro").mkdir(), (tmp / "ro").chmod(0o500)),
        skip="root writes into read-only folders" if os.geteuid() == 0 else "",
    ),
]


@pytest.mark.parametrize("case", params(CASES))
def test_bad_train_input_is_one_clear_error(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    check_case(case, tmp_path, capsys)
    assert not (tmp_path / "runs").exists()  # refused before any run folder was made


SUBPROCESS_CASES = [c for c in CASES if c.id in ("name-dot", "config-binary", "out-a-file")]


@pytest.mark.parametrize("case", params(SUBPROCESS_CASES))
def test_bad_input_through_a_real_process(case, tmp_path):
    check_case_in_subprocess(case, tmp_path)
    assert not (tmp_path / "runs").exists()
