"""``moealign compress`` on a tiny trained run: bad arguments, compress → eval, compress →
resume (continued training), and the compression section of the run config."""

from __future__ import annotations

import json

import pytest
import torch

from helpers_cli import run_cli
from helpers_train import tiny_config
from moealign.cli import main
from moealign.compression import compress_model
from moealign.compression.data import stream_batches
from moealign.config import CompressionConfig, ConfigError, RunConfig, load_config
from moealign.data.build import build_training_data
from moealign.evaluation.run import load_run_model
from moealign.training.checkpoint import load_latest
from moealign.training.trainer import Trainer

STEPS = 4
CALIB_TOKENS = 600


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A 4-step tiny run with 6 experts (top-2) trained with the marginal alignment prior."""
    tmp_path = tmp_path_factory.mktemp("source")
    config = tiny_config(
        tmp_path,
        f"train.steps={STEPS}",
        "model.n_experts=6",
        "alignment.schedule=fixed",
        "alignment.prior=marginal",
        "alignment.prior_decay=0.5",
        "name=base",
    )
    trainer = Trainer(config, progress=False)
    trainer.train()
    trainer.close()
    return tmp_path / "base"


def _compress(source, out, method, keep, *extra):
    argv = ["compress", str(source), "--method", method, "--keep-experts", str(keep)]
    return main([*argv, "--calib-tokens", str(CALIB_TOKENS), "--out", str(out), *extra])


def _one_error_line(stderr: str) -> str:
    """The one ``error:`` line, the last on stderr (progress lines may come before it)."""
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:], stderr
    assert "Traceback" not in stderr
    return lines[-1]


@pytest.mark.parametrize(
    "arguments,message",
    [
        (["--method", "naee", "--keep-experts", "6"], "--keep-experts 6 is not accepted"),
        (["--method", "naee", "--keep-experts", "1"], "expected top_k=2 <= E' < E=6"),
        (["--method", "prune", "--keep-experts", "4"], "--method 'prune' is not accepted"),
        (["--method", "naee", "--keep-experts", "4", "--calib", "nope.txt"], "--calib nope.txt"),
        (["--method", "naee", "--keep-experts", "4", "--rank", "2"], "--rank 2"),
        (["--method", "naee", "--keep-experts", "x"], "invalid int value: 'x'"),
        (["--keep-experts", "4"], "the following arguments are required: --method"),
    ],
)
def test_bad_arguments_give_one_error_line(source_run, tmp_path, capsys, arguments, message):
    try:
        status = main(["compress", str(source_run), *arguments, "--out", str(tmp_path / "out")])
    except SystemExit as exit:  # argparse's own checks (types, required arguments)
        status = exit.code
    assert status == 2
    assert message in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_bad_source_in_a_process(tmp_path):
    (tmp_path / "empty").mkdir()
    argv = ["compress", str(tmp_path / "empty"), "--method", "naee", "--keep-experts", "2"]
    # A generous timeout: the process only starts Python and reads a directory, but the
    # machine running the suite may be busy.
    result = run_cli(*argv, "--out", str(tmp_path / "out"), cwd=tmp_path, timeout=600)
    assert result.returncode == 2
    assert "SOURCE" in _one_error_line(result.stderr) and "no config.json" in result.stderr
    assert not (tmp_path / "out").exists()


def test_an_existing_out_is_not_touched(source_run, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert _compress(source_run, tmp_path / "taken", "naee", 2) == 2
    assert "already exists" in _one_error_line(capsys.readouterr().err)
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["frequency", "naee", "msmoe", "submoe"])
def test_compress_then_eval(source_run, tmp_path, capsys, method):
    out = tmp_path / "compressed"
    assert _compress(source_run, out, method, 4, "--json") == 0
    document, printed = capsys.readouterr()  # --json: the document alone on stdout
    document = json.loads(document)
    assert f"{method}: 6 -> 4 experts" in printed and "inference tokens/s" in printed
    assert document["command"] == "compress"
    assert document["files"] == {"report": str(out / "compression.json")}
    assert document["result"] == json.loads((out / "compression.json").read_text())
    config = load_config(out / "config.json")
    merging = method in ("msmoe", "submoe")
    # Pruning slices the router (R1); merging keeps its 6 rows sharing 4 experts (R2).
    assert (config.model.n_experts, config.model.merged_experts) == (
        (6, 4) if merging else (4, None)
    )
    assert config.compression.method == method
    assert config.compression.source == str(source_run.resolve())
    assert (config.compression.source_n_experts, config.compression.keep_experts) == (6, 4)
    report = json.loads((out / "compression.json").read_text())
    assert [len(layer) for layer in report["compression"]["groups"]] == [4, 4]
    assert report["compression"]["router_update"] == ("R2 share" if merging else "R1 slice")
    assert report["compressed"]["params_total"] < report["original"]["params_total"]
    # The written checkpoint is the API's compression of the source on the same calibration
    # tokens (the first CALIB_TOKENS real tokens of the training stream).
    source_config, source_model = load_run_model(source_run)
    data = build_training_data(source_config)
    batches = stream_batches(data.train, data.tokenizer.pad_id, CALIB_TOKENS)
    assert sum(int(b["attention_mask"].sum()) for b in batches) == CALIB_TOKENS
    expected = compress_model(source_model, method, 4, batches).model
    _, written = load_run_model(out)
    for name, tensor in expected.state_dict().items():
        assert torch.equal(written.state_dict()[name], tensor), name
    # `moealign eval` reads the compressed run; same weights, data and kernels as the report.
    capsys.readouterr()
    assert main(["eval", str(out), "--json", "--quiet"]) == 0
    document, printed = capsys.readouterr()
    evaluation = json.loads((out / "eval.json").read_text())
    assert json.loads(document)["result"] == evaluation and "val loss" in printed
    assert "eval: validation batches" not in printed  # --quiet: no progress
    assert evaluation["val_loss"] == pytest.approx(report["compressed"]["val_loss"], rel=1e-9)


@pytest.mark.slow
def test_compress_then_resume_training(source_run, tmp_path):
    out = tmp_path / "compressed"
    assert _compress(source_run, out, "msmoe", 3) == 0
    groups = json.loads((out / "compression.json").read_text())["compression"]["groups"]
    source_state = load_latest(source_run / "checkpoints").trainer_state
    state = load_latest(out / "checkpoints").trainer_state
    assert [len(layer) for layer in groups] == [3, 3]
    # Merging keeps the E router rows (R2): the marginal prior (L, E) stays as it was.
    source_prior = source_state["aux_terms"][0]["prior"]["value"]
    torch.testing.assert_close(state["aux_terms"][0]["prior"]["value"], source_prior)
    assert (
        state["data"] == source_state["data"]
        and state["tokens_seen"] == source_state["tokens_seen"]
    )

    # `train --resume` without --config continues from the recorded config.
    argv = ["train", "--resume", "--out", str(out), "--set", f"train.steps={STEPS + 2}"]
    assert main([*argv, "--no-progress"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r.get("split") == "train"]
    assert train_steps == [STEPS + 1, STEPS + 2]
    tokens_per_step = 8 * 48  # TINY: batch_size 8, seq_len 48
    assert records[-2]["tokens_seen"] == source_state["tokens_seen"] + 2 * tokens_per_step
    checkpoint = load_latest(out / "checkpoints")
    assert checkpoint.step == STEPS + 2
    _, before = load_run_model(out)  # newest checkpoint: after training
    assert before.moe_layers[0].experts.w_gate.shape[0] == 3
    assert before.moe_layers[0].router.weight.shape[0] == 6


def test_compression_section_is_recorded_only_for_compressed_runs(tmp_path):
    plain = tiny_config(tmp_path)
    assert "compression" not in plain.to_dict()

    def recorded(n_experts: int, **compression) -> RunConfig:
        """A config as a compressed run's config.json records it (only compress writes it)."""
        data = plain.to_dict()
        data["model"]["n_experts"] = n_experts
        path = tmp_path / "config.json"
        path.write_text(json.dumps({**data, "compression": compression}))
        return load_config(path)

    compressed = recorded(3, method="naee", source_n_experts=4, keep_experts=3)
    assert compressed.to_dict()["compression"]["method"] == "naee"
    with pytest.raises(ConfigError, match="compression.keep_experts"):
        recorded(4, method="naee", keep_experts=3)
    with pytest.raises(ConfigError, match="moealign compress"):  # never in a config file
        tiny_config(tmp_path, "compression.method=naee")
    assert RunConfig().compression == CompressionConfig()
