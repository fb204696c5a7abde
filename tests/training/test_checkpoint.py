"""Checkpoints: exact round trip of weights (tied), optimizer and trainer state; atomic
writes; retention; corruption detection and fallback. Run directories: no accidental
overwrite, resume checks, metrics truncation."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from moealign.training.checkpoint import (
    CheckpointError,
    capture_rng_state,
    decode_state,
    encode_state,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    restore_rng_state,
    save_checkpoint,
)
from moealign.training.runs import RunDirectory, RunExistsError


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("expert_bias", torch.zeros(3))

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.embed(ids))))


def _trained(steps: int, seed: int = 0):
    torch.manual_seed(seed)
    model = TiedLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.9))
    ids = torch.randint(0, 11, (4, 5))
    for _ in range(steps):
        optimizer.zero_grad()
        model(ids).logsumexp(-1).mean().backward()
        optimizer.step()
        model.expert_bias += 0.5
    return model, optimizer, ids


def _assert_same_optimizer_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for key in sa["state"]:
        for name, value in sa["state"][key].items():
            assert torch.equal(value, sb["state"][key][name]), (key, name)


def test_encode_decode_round_trip_is_exact():
    state = {
        3: {"step": torch.tensor(7.0), "buf": torch.randn(2, 3, dtype=torch.bfloat16)},
        "betas": (0.9, 0.95),
        "rng": torch.get_rng_state(),
        "np": np.random.default_rng(0).integers(0, 2**32, size=5, dtype=np.uint32),
        "nested": [{"__odd": 1.5, "x": None, "flag": True}],
        "prior": torch.rand(2, 4, dtype=torch.float64),
    }
    for tensors in (None, {}):
        encoded = encode_state(state, tensors)
        decoded = decode_state(json.loads(json.dumps(encoded)), tensors)
        assert decoded.keys() == state.keys() and 3 in decoded
        assert torch.equal(decoded[3]["buf"], state[3]["buf"])
        assert decoded[3]["buf"].dtype == torch.bfloat16
        assert decoded["betas"] == (0.9, 0.95)
        assert torch.equal(decoded["rng"], state["rng"])
        assert np.array_equal(decoded["np"], state["np"]) and decoded["np"].dtype == np.uint32
        assert decoded["nested"] == state["nested"]
        assert torch.equal(decoded["prior"], state["prior"])
    with pytest.raises(TypeError, match="object at 'x'"):
        encode_state({"x": object()})


def test_rng_state_capture_and_restore():
    state = decode_state(json.loads(json.dumps(encode_state(capture_rng_state()))))
    expected = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


def test_save_load_restores_weights_ties_optimizer_and_continues_identically(tmp_path):
    model, optimizer, ids = _trained(3)
    path = save_checkpoint(tmp_path, 3, model, optimizer, {"data": {"pos": 9}}, keep=2)
    assert path.name == "step_000003"
    assert sorted(p.name for p in path.iterdir()) == [
        "model.safetensors",
        "optimizer.safetensors",
        "state.json",
    ]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp dirs left

    fresh, fresh_optimizer, _ = _trained(0, seed=1)
    checkpoint = load_checkpoint(path)
    checkpoint.load_model(fresh)
    checkpoint.load_optimizer(fresh_optimizer)
    assert checkpoint.step == 3 and checkpoint.trainer_state == {"data": {"pos": 9}}
    assert fresh.head.weight is fresh.embed.weight
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    _assert_same_optimizer_state(optimizer, fresh_optimizer)
    for m, o in ((model, optimizer), (fresh, fresh_optimizer)):
        o.zero_grad()
        m(ids).logsumexp(-1).mean().backward()
        o.step()
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)


def test_keeps_only_the_newest_checkpoints_and_resaves_a_step(tmp_path):
    model, optimizer, _ = _trained(1)
    for step in (1, 2, 3, 10):
        save_checkpoint(tmp_path, step, model, optimizer, {"step": step}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000003", "step_000010"]
    save_checkpoint(tmp_path, 10, model, optimizer, {"again": True}, keep=2)
    assert load_latest(tmp_path).trainer_state == {"again": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000003", "step_000010"]
    assert load_latest(tmp_path / "empty") is None


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.safetensors", "state.json"])
def test_truncated_file_is_named_and_fallback_uses_the_previous_checkpoint(tmp_path, victim):
    model, optimizer, _ = _trained(2)
    save_checkpoint(tmp_path, 1, model, optimizer, {"which": 1}, keep=3)
    newest = save_checkpoint(tmp_path, 2, model, optimizer, {"which": 2}, keep=3)
    file = newest / victim
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])

    with pytest.raises(CheckpointError, match=f"{victim}.*(corrupt|truncated)"):
        load_latest(tmp_path)
    warnings: list[str] = []
    checkpoint = load_latest(tmp_path, fallback=True, warn=warnings.append)
    assert checkpoint.step == 1 and checkpoint.trainer_state == {"which": 1}
    assert any(victim in w for w in warnings) and any("step_000001" in w for w in warnings)


def test_missing_file_and_no_usable_checkpoint(tmp_path):
    model, optimizer, _ = _trained(1)
    only = save_checkpoint(tmp_path, 1, model, optimizer, {}, keep=1)
    (only / "optimizer.safetensors").unlink()
    with pytest.raises(CheckpointError, match="optimizer.safetensors is missing"):
        load_latest(tmp_path)
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        load_latest(tmp_path, fallback=True, warn=lambda message: None)


def test_run_directory_refuses_to_overwrite_and_checks_resume(tmp_path):
    config = {"model": {"d_model": 8}, "train": {"steps": 5}}
    run = RunDirectory.open(tmp_path / "r", config, seed=1, device="cpu")
    meta = json.loads((run.path / "meta.json").read_text())
    assert meta["seed"] == 1 and meta["versions"]["torch"] == torch.__version__
    assert {"git_commit", "hostname", "command", "start_time", "python"} <= meta.keys()
    for step in (1, 2, 3):
        run.log_metrics({"step": step, "loss": 1.0 / step})
    with pytest.raises(RunExistsError, match="--resume.*--overwrite"):
        RunDirectory.open(tmp_path / "r", config, seed=1, device="cpu")
    changed = {"model": {"d_model": 16}, "train": {"steps": 5}}
    with pytest.raises(RunExistsError, match=r"model\.d_model: 8 -> 16"):
        RunDirectory.open(tmp_path / "r", changed, seed=1, device="cpu", resume=True)
    longer = {"model": {"d_model": 8}, "train": {"steps": 9}}
    resumed = RunDirectory.open(tmp_path / "r", longer, seed=1, device="cpu", resume=True)
    assert len(json.loads((resumed.path / "meta.json").read_text())["resumed"]) == 1
    resumed.truncate_metrics(2)
    assert [r["step"] for r in resumed.read_metrics()] == [1, 2]
    fresh = RunDirectory.open(tmp_path / "r", changed, seed=1, device="cpu", overwrite=True)
    assert (
        fresh.read_metrics() == []
        and json.loads((fresh.path / "config.json").read_text()) == changed
    )


def _sha(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _edit_state(edit):
    def corrupt(checkpoint):
        path = checkpoint / "state.json"
        new = edit(json.loads(path.read_text()))
        path.write_text(new if isinstance(new, str) else json.dumps(new))

    return corrupt


def _reshaped_weight(checkpoint):
    """A weight of another shape whose SHA-256 is recorded: only loading it finds it."""
    from safetensors.torch import load_file, save_file

    path = checkpoint / "model.safetensors"
    tensors = load_file(str(path))
    tensors["mix.weight"] = torch.zeros(2, 2)
    save_file(tensors, str(path))
    _edit_state(lambda s: _set_files(s, **{"model.safetensors": _sha(path)}))(checkpoint)


def _set_files(state, **files):
    state["files"] = {**state["files"], **files}
    return state


CORRUPTIONS = {
    "files-emptied": _edit_state(lambda s: {**s, "files": {}}),
    "optimizer-checksum-dropped": _edit_state(
        lambda s: {**s, "files": {"model.safetensors": s["files"]["model.safetensors"]}}
    ),
    "checksum-not-hex": _edit_state(lambda s: _set_files(s, **{"model.safetensors": "x"})),
    "file-outside-the-folder": _edit_state(lambda s: _set_files(s, **{"../state.json": "0" * 64})),
    "step-a-string": _edit_state(lambda s: {**s, "step": "2"}),
    "step-negative": _edit_state(lambda s: {**s, "step": -1}),
    "step-of-another-folder": _edit_state(lambda s: {**s, "step": 7}),
    "missing-trainer": _edit_state(lambda s: {k: v for k, v in s.items() if k != "trainer"}),
    "trainer-a-list": _edit_state(lambda s: {**s, "trainer": [1]}),
    "a-json-list": _edit_state(lambda s: [s]),
    "deep-nesting": _edit_state(lambda s: '{"step": 2, "trainer": ' + "[" * 50_000 + "}"),
    "bad-tensor-dtype": _edit_state(
        lambda s: {
            **s,
            "trainer": {"t": {"__tensor_data__": {"dtype": "load", "shape": [1], "values": [1]}}},
        }
    ),
    "bad-tensor-shape": _edit_state(
        lambda s: {
            **s,
            "trainer": {
                "t": {"__tensor_data__": {"dtype": "float32", "shape": [3], "values": [1]}}
            },
        }
    ),
    "wrong-shape-weight": _reshaped_weight,
    "unreadable-optimizer-index": lambda c: _rewrite_optimizer_index(c, "{not json"),
}


def _rewrite_optimizer_index(checkpoint, index: str) -> None:
    from safetensors.torch import load_file, save_file

    path = checkpoint / "optimizer.safetensors"
    save_file(load_file(str(path)), str(path), metadata={"moealign_index": index})
    _edit_state(lambda s: _set_files(s, **{"optimizer.safetensors": _sha(path)}))(checkpoint)


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_any_load_failure_falls_back_to_the_previous_checkpoint(tmp_path, corruption):
    model, optimizer, _ = _trained(2)
    save_checkpoint(tmp_path, 1, model, optimizer, {"which": 1}, keep=3)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    _trained_more = _trained(3)
    newest = save_checkpoint(tmp_path, 2, *_trained_more[:2], {"which": 2}, keep=3)
    CORRUPTIONS[corruption](newest)

    fresh, fresh_optimizer, _ = _trained(0, seed=5)

    def apply(checkpoint):
        checkpoint.load_model(fresh)
        checkpoint.load_optimizer(fresh_optimizer)

    with pytest.raises(CheckpointError, match="step_000002"):
        load_latest(tmp_path, apply=apply)
    warnings: list[str] = []
    checkpoint = load_latest(tmp_path, fallback=True, warn=warnings.append, apply=apply)
    assert checkpoint.step == 1 and checkpoint.trainer_state == {"which": 1}
    assert "step_000002" in warnings[0] and "step_000001" in warnings[-1]
    for name, value in fresh.state_dict().items():  # the previous checkpoint's weights, whole
        assert torch.equal(value, expected[name]), name
