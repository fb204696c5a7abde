"""``moealign roma`` end to end on a tiny pretrained run (slow: a real train + study)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers_cli import run_cli
from moealign.config import load_config
from moealign.evaluation.tasks import TaskEvaluation, TaskResult
from moealign.roma.study import (
    METHODS,
    SETS,
    macro_accuracy_replicates,
    markdown_tables,
    summarise,
)
from moealign.training.trainer import Trainer

BASE = [
    "data.source=tasks",
    "data.format=multiple_choice",
    "data.examples_per_task=40",
    "data.tasks=['copy', 'max', 'brackets', 'min']",
    "data.heldout_tasks=['min']",
    "data.heldout_compositions=[]",
    "model.n_layers=2",
    "model.d_model=32",
    "model.n_heads=2",
    "model.vocab_size=258",
    "model.max_seq_len=128",
    "model.n_experts=4",
    "model.expert_d_ff=32",
    "train.seq_len=112",
    "train.batch_size=16",
    "train.steps=30",
    "train.eval_every=0",
    "train.eval_batches=1",
    "optim.warmup_steps=3",
    "optim.lr=1e-2",
]
STUDY = [
    "encoder=builtin",
    "seeds=[0, 1]",
    "train_examples_per_task=12",
    "eval_examples_per_task=12",
    "epochs=1",
    "batch_size=8",
    "oracle_steps=3",
    "c3po_ngd_steps=[1, 2]",
    "c3po_ngd_lrs=[1.0, 30.0]",
    "c3po_ngd_validation_per_task=2",
    "lambda_warmup_steps=2",
    "device=cpu",
]


@pytest.mark.slow
def test_roma_study_end_to_end(tmp_path):
    config = load_config(None, [*BASE, f"out_dir={tmp_path}", "name=base"])
    trainer = Trainer(config, progress=False)
    trainer.train()
    out = tmp_path / "roma"
    args = ["roma", "--base", str(tmp_path / "base"), "--out", str(out)]
    for override in STUDY:
        args += ["--set", override]
    result = run_cli(*args, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["layers"] == [0, 1]  # layers = 5 clipped to the model's 2 MoE layers
    assert results["tasks"] == {"seen": ["brackets", "copy", "max"], "heldout": ["min"]}
    for method in METHODS:
        for seed in ("0", "1"):
            for name in SETS:
                tasks = results["methods"][method][seed][name]["tasks"]
                # 40 examples per task: 6 in the test split; held-out sets hold 150 (cut to 12)
                size = 6 if name == "seen" else 12
                assert all(len(t["correct"]) == size for t in tasks.values())
    # base and oracle do not depend on the seed; oracle is the upper bound of the base routing
    methods = results["methods"]
    assert methods["base"]["0"] == methods["base"]["1"]
    summary = results["summary"]
    for name in SETS:
        assert (
            summary["accuracy"]["oracle"][name]["mean"] >= summary["accuracy"]["base"][name]["mean"]
        )
        difference = summary["roma_minus_router_tuning"][name]
        assert difference["outcome"] in ("lower", "higher", "equivalent", "inconclusive")
        assert difference["family"] == 2 and difference["margin"] == 0.01
        roma = summary["accuracy"]["roma"][name]
        assert roma["ci_low"] <= roma["mean"] <= roma["ci_high"]
    assert results["seeds"]["0"]["roma"]["regularizer_first"] > 0
    # Every method but the base reports its evaluation time against the base model's.
    assert set(results["inference_cost"]) == set(METHODS) - {"base"}
    for method, cost in results["inference_cost"].items():
        assert all(cost[name]["ratio"] > 0 for name in SETS), method
    assert results["seeds"]["0"]["oracle_tuning"]["oracle_targets_s"] > 0
    # C3PO NGD: per seed, every (lr, steps) of the grid evaluated on 2 validation questions
    # per seen task (3 tasks), and the best validation accuracy (first on ties) chosen.
    for seed in ("0", "1"):
        choice = results["seeds"][seed]["c3po_ngd"]
        grid = choice["grid"]
        assert [(g["lr"], g["steps"]) for g in grid] == [(1.0, 1), (1.0, 2), (30.0, 1), (30.0, 2)]
        assert choice["validation_examples"] == 6
        best = max(g["validation_accuracy"] for g in grid)
        first = next(g for g in grid if g["validation_accuracy"] == best)
        assert (choice["lr"], choice["steps"]) == (first["lr"], first["steps"])
    table = (out / "results.md").read_text()
    assert all(f"| {method} |" in table for method in METHODS)
    assert "| roma |" in result.stdout

    # methods = ["roma"]: only the base model (the reference) and RoMA run, and RoMA's results
    # are those of the full study (same seeds, same training draws, same trained routers)
    only = tmp_path / "roma_only"
    args = [
        "roma",
        "--base",
        str(tmp_path / "base"),
        "--out",
        str(only),
        "--set",
        'methods=["roma"]',
    ]
    for override in STUDY:
        args += ["--set", override]
    result = run_cli(*args, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    restricted = json.loads((only / "results.json").read_text())
    assert set(restricted["methods"]) == {"base", "roma"}
    for method in ("base", "roma"):
        assert restricted["methods"][method] == methods[method]
    assert restricted["summary"]["accuracy"]["roma"] == summary["accuracy"]["roma"]
    assert restricted["summary"]["gap_closure"]["roma"]["seen"]["mean"] is None  # no oracle
    assert restricted["summary"]["ctgi"]["roma"]["mean"] is None
    assert "roma_minus_router_tuning" not in restricted["summary"]
    assert set(restricted["inference_cost"]) == {"roma"}
    assert set(restricted["seeds"]["0"]) == {
        "train_examples",
        "successful",
        "mean_neighbours",
        "roma",
    }
    table = (only / "results.md").read_text()
    assert "| roma |" in table and "| oracle |" not in table and "| c3po |" not in table


def test_roma_cli_reports_a_missing_run(tmp_path):
    result = run_cli(
        "roma", "--base", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), cwd=tmp_path
    )
    assert result.returncode == 2
    assert "base" in result.stderr and "no config.json" in result.stderr


def _evaluation(correct_by_task: dict[str, int], n: int = 60) -> TaskEvaluation:
    results = {}
    for task, n_correct in correct_by_task.items():
        correct = [1] * n_correct + [0] * (n - n_correct)
        results[task] = TaskResult(task, "multiple_choice", n_correct / n, correct, [], [])
    return TaskEvaluation(results)


def test_summary_reports_ctgi_beside_the_plain_gain_and_warns_on_small_headroom():
    """The study doc's C3PO row by hand (60 questions per task): CTGI +0.056 from per-task
    gains −1/6, 0/5, +1/3, while the plain held-out gain is 0; tasks with 5 and 3 questions of
    headroom (under 10 points) carry 76% of the CTGI weight."""
    seen = {"copy": 50}
    heldout = {
        "base": {"min": 14, "sort_then_reverse": 31, "cipher_then_reverse": 32},
        "c3po": {"min": 13, "sort_then_reverse": 31, "cipher_then_reverse": 33},
        "oracle": {"min": 20, "sort_then_reverse": 36, "cipher_then_reverse": 35},
    }
    per_seed = {
        method: {"0": {"seen": _evaluation(seen), "heldout": _evaluation(answers)}}
        for method, answers in heldout.items()
    }
    summary = summarise(per_seed, [0])
    c3po = summary["ctgi"]["c3po"]
    assert c3po["mean"] == pytest.approx((-1 / 6 + 0 + 1 / 3) / 3)
    assert c3po["accuracy_gain"] == pytest.approx(0.0, abs=1e-12)
    entry = c3po["per_seed"][0]
    assert entry["gain_ci_low"] < 0 < entry["gain_ci_high"]
    assert entry["small_headroom_share"] == pytest.approx(32 / 42)
    results = {"base_run": "b", "config": {"seeds": [0]}, "summary": summary, "inference_cost": {}}
    table = markdown_tables(results)
    row = next(line for line in table.splitlines() if line.startswith("| c3po |"))
    assert "| +0.0 [" in row and "| +0.056 [" in row
    assert "c3po, seed 0: tasks with headroom under 0.1" in table and "76%" in table
    # The references' CTGI is 0 and 1 by construction: no warning for them.
    assert "- base," not in table and "- oracle," not in table
    # Without the oracle: the plain gain, no CTGI.
    no_oracle = summarise({m: per_seed[m] for m in ("base", "c3po")}, [0])
    assert no_oracle["ctgi"]["c3po"]["mean"] is None
    assert no_oracle["ctgi"]["c3po"]["accuracy_gain"] == pytest.approx(0.0, abs=1e-12)


def _seed_evaluation(correct: dict[str, list[int]]) -> TaskEvaluation:
    return TaskEvaluation(
        {
            t: TaskResult(t, "multiple_choice", sum(c) / len(c), c, [], [])
            for t, c in correct.items()
        }
    )


def test_macro_accuracy_interval_resamples_seeds_then_the_same_questions():
    rng = np.random.default_rng(0)
    answers = {  # seed → task → 40 answers of one method; the questions are shared by the seeds
        str(seed): {
            task: rng.binomial(1, p, size=40).tolist() for task, p in (("a", 0.3), ("b", 0.7))
        }
        for seed in range(3)
    }
    by_seed = {
        k: {"seen": _seed_evaluation(v), "heldout": _seed_evaluation(v)} for k, v in answers.items()
    }
    keys = ["0", "1", "2"]
    estimate, replicates = macro_accuracy_replicates([by_seed], keys, "seen", n_resamples=4000)
    assert estimate[0] == pytest.approx(np.mean([by_seed[k]["seen"].macro_accuracy for k in keys]))
    reference_rng = np.random.default_rng(1)
    reference = []
    for _ in range(4000):
        seeds = reference_rng.integers(0, 3, size=3)
        task_means = []
        for task in ("a", "b"):
            questions = reference_rng.integers(0, 40, size=40)  # one draw for every seed
            task_means.append(np.mean([np.take(answers[keys[s]][task], questions) for s in seeds]))
        reference.append(np.mean(task_means))
    np.testing.assert_allclose(
        np.quantile(replicates[:, 0], [0.025, 0.975]),
        np.quantile(reference, [0.025, 0.975]),
        atol=0.015,
    )
    summary = summarise({"base": by_seed, "roma": by_seed, "router_tuning": by_seed}, [0, 1, 2])
    assert summary["accuracy"]["roma"]["seen"]["ci_low"] == pytest.approx(
        np.quantile(replicates[:, 0], 0.025), abs=0.015
    )
    # Identical methods: every replicate difference is 0, within ±1 point: equivalent.
    same = summary["roma_minus_router_tuning"]["heldout"]
    assert same["delta"] == 0.0 and same["outcome"] == "equivalent" and same["p_value"] == 1.0
    assert summary["over_seeds"]["roma"]["accuracy_gain"]["outcome"] == "equivalent"


def test_single_seed_studies_merge_into_one_summary(tmp_path):
    """scripts/roma_summary.py: three one-seed results.json give the summary of one study."""
    import importlib.util
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "roma_summary.py"
    spec = importlib.util.spec_from_file_location("roma_summary", script)
    roma_summary = importlib.util.module_from_spec(spec)
    sys.modules["roma_summary"] = roma_summary
    spec.loader.exec_module(roma_summary)

    rng = np.random.default_rng(4)
    per_seed: dict = {m: {} for m in ("base", "router_tuning", "roma")}
    for seed in range(3):
        for method in per_seed:
            answers = {t: rng.binomial(1, 0.5, size=20).tolist() for t in ("a", "b")}
            evaluation = _seed_evaluation(answers)
            per_seed[method][str(seed)] = {"seen": evaluation, "heldout": evaluation}
        results = {
            "base_run": "b",
            "config": {"seeds": [seed]},
            "methods": {
                m: {str(seed): {n: e.to_dict() for n, e in by_seed[str(seed)].items()}}
                for m, by_seed in per_seed.items()
            },
            "inference_cost": {},
        }
        (tmp_path / f"s{seed}").mkdir()
        (tmp_path / f"s{seed}" / "results.json").write_text(json.dumps(results))
    directories = [tmp_path / f"s{seed}" for seed in range(3)]
    merged = roma_summary.merged_results(directories)
    assert merged["config"]["seeds"] == [0, 1, 2]
    assert merged["summary"] == summarise(per_seed, [0, 1, 2])
    assert "RoMA − router tuning" in markdown_tables(merged)
    with pytest.raises(ValueError, match="seed 0 is already"):
        roma_summary.merged_results([directories[0], directories[0]])
    # Without the prediction and reference texts (as the results kept under docs/results/):
    # the same summary, which reads only the per-example correctness.
    for directory in directories:
        results = json.loads((directory / "results.json").read_text())
        for by_seed in results["methods"].values():
            for sets in by_seed.values():
                for record in sets.values():
                    for task in record["tasks"].values():
                        del task["predictions"], task["references"]
        (directory / "results.json").write_text(json.dumps(results))
    assert roma_summary.merged_results(directories)["summary"] == merged["summary"]
