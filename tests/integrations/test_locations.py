"""A name that looks like a local path never goes to the Hugging Face Hub (issue 25): each
``from_pretrained``/``load_dataset`` call site refuses a missing local path at once, naming it,
and the command line does so before torch or transformers load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers_cli import cli_env
from moealign.config import ConfigError
from moealign.integrations.locations import looks_local, pretrained_location

pytest.importorskip("transformers")
pytest.importorskip("datasets")


@pytest.fixture
def here(tmp_path, monkeypatch):
    """A working folder with a sub-folder ``hf/`` (so ``hf/missing`` is a path under it)."""
    (tmp_path / "hf").mkdir()
    (tmp_path / "t.txt").write_text("hello world\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    ("name", "local"),
    [
        ("hf/missing", True),
        ("nothere/model", True),  # a path separator: local, though no folder nothere/ exists
        ("./model", True),
        ("../model", True),
        ("/abs/model", True),
        ("~/model", True),
        ("runs/a/hf", True),
        ("model/", True),
        ("a\\b", True),
        ("t.txt", True),  # exists
        ("gpt2", False),
        ("allenai/OLMoE-1B-7B-0924", True),  # org/name is a path unless written hub:...
        ("hub:allenai/OLMoE-1B-7B-0924", False),
    ],
)
def test_which_names_look_local(here, name, local):
    assert looks_local(name) is local


def test_a_missing_local_path_is_refused_naming_it(here):
    with pytest.raises(
        ConfigError, match=r"^--hf-model: got 'hf/missing', a local path that does not exist"
    ):
        pretrained_location("hf/missing", "--hf-model")
    assert pretrained_location("hf", "x") == "hf" and pretrained_location("gpt2", "x") == "gpt2"
    assert pretrained_location(Path("hf"), "x") == "hf"
    assert pretrained_location("hub:org/name", "x") == "org/name"


@pytest.fixture
def no_hub(monkeypatch):
    """Every loader that could reach the Hub fails the test if called."""
    import datasets
    import transformers

    def reached(*args, **kwargs):
        raise AssertionError(f"went to a loader with {args}")

    for name in ("AutoConfig", "AutoModelForCausalLM", "AutoTokenizer"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", reached)
    monkeypatch.setattr(datasets, "load_dataset", reached)


def _call_sites():
    import argparse

    from moealign.compression.hf_models import HFSource
    from moealign.data.loaders import load_hf_dataset
    from moealign.data.tokenizer import load_transformers_tokenizer
    from moealign.integrations.analyze import run_analyze
    from moealign.integrations.hf_export import import_pretrained
    from moealign.roma.config import RomaConfig
    from moealign.roma.study import RomaStudy

    analyze_args = argparse.Namespace(model="hf/missing", tokenizer=None, data="t.txt")
    analyze_args.text_field = "text"
    return {
        "tokenizer": lambda: load_transformers_tokenizer("hf/missing"),
        "import_pretrained": lambda: import_pretrained("hf/missing"),
        "compress": lambda: HFSource.open("hf/missing"),
        "dataset": lambda: load_hf_dataset("hf/missing"),
        "analyze": lambda: run_analyze(analyze_args),
        "roma": lambda: RomaStudy.from_hf_model("hf/missing", "q.jsonl", [], RomaConfig()),
    }


@pytest.mark.parametrize(
    "site", ["tokenizer", "import_pretrained", "compress", "dataset", "analyze", "roma"]
)
def test_every_loader_refuses_a_missing_local_path(here, no_hub, monkeypatch, site):
    import moealign.roma.study as study

    monkeypatch.setattr(study, "load_questions", lambda path: [])
    monkeypatch.setattr(study, "split_questions", lambda questions, heldout: ([], [], []))
    with pytest.raises(ValueError, match="'hf/missing', a local path that does not exist"):
        _call_sites()[site]()


@pytest.mark.parametrize(
    "args",
    [
        ["analyze", "hf/missing", "--data", "t.txt"],
        ["roma", "--hf-model", "hf/missing", "--questions", "t.txt", "--out", "o"],
        ["compress", "hf/missing", "--method", "frequency", "--keep-experts", "2", "--out", "o"],
    ],
    ids=["analyze", "roma", "compress"],
)
def test_the_command_line_refuses_before_loading_anything(here, args):
    """One ``error:`` line naming the path, exit 2, and neither torch nor transformers nor
    huggingface_hub imported (nothing could have reached the Hub)."""
    code = (
        "import json, sys\n"
        "from moealign.cli import main\n"
        f"status = main({args!r})\n"
        "heavy = [m for m in ('torch', 'transformers', 'huggingface_hub') if m in sys.modules]\n"
        "print(json.dumps([status, heavy]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=here, env=cli_env(), capture_output=True, text=True
    )
    status, heavy = json.loads(done.stdout)
    assert status == 2 and heavy == []
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")
    assert "'hf/missing'" in done.stderr
