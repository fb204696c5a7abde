"""Reports: ablation statistics against scipy, every section and figure, model cards, compare."""

from __future__ import annotations

import base64
import json
import math
import re
import resource

import numpy as np
import pytest
from matplotlib.image import imread
from scipy import stats as scipy_stats

from helpers_cli import CONFIGS
from moealign.cli import main
from moealign.config import load_config
from moealign.evaluation.ctgi import ctgi
from moealign.studies.report import (
    ablation_table,
    baseline_table,
    build_report,
    compare_runs,
    metric_direction,
    transfer_table,
)
from moealign.studies.results import (
    RunDataError,
    load_run,
    load_runs,
    run_results,
    steps_to_reference_loss,
    time_to_target,
)
from moealign.training.trainer import Trainer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
VAL_LOSS = {"base": [2.0, 2.2, 2.1], "better": [1.8, 1.95, 1.9]}
HELDOUT = {"base": {"subtraction": 0.2, "min": 0.4}, "better": {"subtraction": 0.6, "min": 0.55}}
SEEN = {"base": {"copy": 0.9, "reverse": 0.7}, "better": {"copy": 0.95, "reverse": 0.75}}
N_EXAMPLES = 20


def correct_array(accuracy, seed):
    """N_EXAMPLES 0/1 answers with the given accuracy, the ones placed differently per seed."""
    ones = round(accuracy * N_EXAMPLES)
    return np.roll([1] * ones + [0] * (N_EXAMPLES - ones), 3 * seed).tolist()


def answers(per_task, seed):
    return {
        "tasks": {
            task: {
                "accuracy": accuracy,
                "correct": correct_array(accuracy, seed),
                "references": [f"{task}-{seed}-{i}" for i in range(N_EXAMPLES)],
            }
            for task, accuracy in per_task.items()
        }
    }


def write_run(path, *, seed, val_loss, variant="base", diverge_at=None, events=(), dead=False):
    """A hand-written run directory: 4 logged steps of 100 tokens at 1000 tokens/s (0.1 s
    each), validation at steps 2 (val_loss + 0.5) and 4 (val_loss)."""
    path.mkdir(parents=True)
    config = load_config(
        CONFIGS / "tiny.toml", [f"train.seed={seed}", "train.steps=4", "optim.warmup_steps=1"]
    )
    (path / "config.json").write_text(json.dumps(config.to_dict()))
    meta = {
        "seed": seed,
        "device": "cpu",
        "hostname": "testhost",
        "python": "3.11.7",
        "git_commit": "abc1234",
        "versions": {"torch": "2.13.0"},
        "command": ["/src/moealign/cli.py", "train", "--config", "configs/tiny.toml"],
        "start_time": "2026-01-01T00:00:00+00:00",
        "end_time": "2026-01-01T00:00:12+00:00",
    }
    (path / "meta.json").write_text(json.dumps(meta))
    records = []
    for step in range(1, 5):
        bad = diverge_at is not None and step >= diverge_at
        record = {
            "step": step,
            "split": "train",
            "loss": math.nan if bad else val_loss + 1.0 - 0.1 * step + 0.01 * seed,
            "lr": 1e-3 * step,
            "tokens_per_s": 1000.0,
            "tokens_seen": 100 * step,
            "routing/token_entropy": 0.9 - 0.01 * step,
            "routing/usage_entropy": 0.95,
            "routing/max_vio": 0.3 + 0.01 * seed,
            "routing/dead_experts": 1.0 if dead and step == 3 else 0.0,
        }
        if variant == "better":
            record["lambda"] = 0.1 * step
        records.append(record)
        if step % 2 == 0:
            val = math.nan if bad else val_loss + (0.5 if step == 2 else 0.0)
            records.append({"step": step, "split": "val", "val_loss": val})
    records += [{"step": step, "event": name, "layer": 1} for step, name in events]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if diverge_at is not None:
        return
    counts = [[10.0, 12.0, 9.0, 9.0], [20.0, 10.0, 10.0, 0.0 if dead else 1.0]]
    final = {
        "step": 4,
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss),
        "val_routing/max_vio": 0.2,
        "params_total": 1000,
        "params_active": 600,
        "peak_memory_bytes": 50 * 2**20,
        "expert_counts": counts,
        "task_accuracy": {"seen": SEEN[variant], "heldout": HELDOUT[variant]},
        "tasks": {
            "sets": {
                "test": answers(SEEN[variant], seed),
                "heldout_tasks": answers(HELDOUT[variant], seed),
            }
        },
    }
    (path / "final_eval.json").write_text(json.dumps(final))


@pytest.fixture
def study_dir(tmp_path):
    """A hand-written study: base and better over seeds 0–2, a diverged and a failed cell."""
    root = tmp_path / "study"
    cells = []
    for variant, losses in VAL_LOSS.items():
        for seed, loss in enumerate(losses):
            run_dir = root / f"{variant}__seed{seed}"
            write_run(
                run_dir,
                seed=seed,
                val_loss=loss,
                variant=variant,
                events=[(3, "routing_collapse")] if (variant, seed) == ("better", 1) else (),
                dead=(variant, seed) == ("base", 2),
            )
            cells.append((variant, seed, run_dir, "finished", ""))
    write_run(root / "unstable__seed0", seed=0, val_loss=2.0, diverge_at=3)
    cells.append(("unstable", 0, root / "unstable__seed0", "diverged", ""))
    cells.append(("broken", 0, root / "broken__seed0", "failed", "ValueError: bad data"))
    study = {
        "name": "fixture",
        "baseline": "base",
        "cells": [
            {"cell": d.name, "variant": v, "seed": s, "run_dir": str(d), "status": st, "error": e}
            for v, s, d, st, e in cells
        ],
    }
    (root / "study.json").write_text(json.dumps(study))
    return root


def _numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"[-+]?\d+\.?\d*(?:e[-+]?\d+)?", text.replace(",", ""))]


def test_metric_directions():
    assert metric_direction("val_loss") == "lower" and metric_direction("val_ppl") == "lower"
    assert metric_direction("val_routing/max_vio") == "lower"
    assert metric_direction("task_accuracy/heldout/mean") == "higher"
    assert metric_direction("tokens_per_s") == "higher"
    assert metric_direction("val_routing/usage_entropy") == "higher"
    assert metric_direction("val_routing/token_entropy") is None


def test_ablation_interval_and_paired_test_match_scipy(study_dir):
    run_set = load_runs([study_dir])
    assert run_set.variants == ["base", "better", "unstable", "broken"]
    table = ablation_table(run_set, ["val_loss", "tokens_per_s"])
    rows = {row[0]: row for row in table.rows}
    for variant, losses in VAL_LOSS.items():
        low, high = scipy_stats.t.interval(
            0.95, len(losses) - 1, loc=np.mean(losses), scale=scipy_stats.sem(losses)
        )
        mean, half_width = _numbers(rows[variant][2])
        assert mean == pytest.approx(np.mean(losses), rel=1e-3)
        assert half_width == pytest.approx((high - low) / 2, rel=1e-3)
        assert rows[variant][1] == "3/3"
    assert rows["unstable"][1:3] == ["0/1 (1 diverged)", "–"]
    assert rows["broken"][1] == "0/1 (1 failed)"
    better_row = table.rows.index(rows["better"])
    assert (better_row, 2) in table.bold and (0, 2) not in table.bold  # lower loss is better
    assert not any(column == 3 for _, column in table.bold)  # every tokens/s equal: none best

    deltas = {row[0]: row for row in baseline_table(run_set, "base", ["val_loss"]).rows}
    reference = scipy_stats.ttest_rel(VAL_LOSS["better"], VAL_LOSS["base"])
    difference = np.subtract(VAL_LOSS["better"], VAL_LOSS["base"])
    assert deltas["better"][1] == "base"
    delta, half_width, p_value, n = _numbers(deltas["better"][2])
    assert delta == pytest.approx(difference.mean(), rel=1e-3)
    t_critical = scipy_stats.t.ppf(0.975, 2)
    assert half_width == pytest.approx(t_critical * scipy_stats.sem(difference), rel=1e-3)
    assert p_value == pytest.approx(reference.pvalue, abs=1e-3) and n == 3
    assert deltas["unstable"][2] == "–"


def test_time_to_target_and_efficiency_from_hand_computed_numbers(tmp_path):
    write_run(tmp_path / "run", seed=0, val_loss=2.0)
    run = load_run(tmp_path / "run")
    assert time_to_target(run, 2.3) == (4, pytest.approx(0.4))  # step 2 logged 2.5 > 2.3
    assert time_to_target(run, 2.5) == (2, pytest.approx(0.2))
    assert time_to_target(run, 1.0) is None
    results = run_results(run)
    assert results["tokens_per_s"] == 1000.0 and results["train_time_s"] == pytest.approx(0.4)
    assert results["wall_time_s"] == 12.0 and results["peak_memory_mib"] == 50.0
    assert results["task_accuracy/heldout/mean"] == pytest.approx(0.3)
    assert results["task_accuracy/seen/copy"] == 0.9
    # means over the 4 logged training steps; z_loss was never logged, so it is absent
    assert results["train_mean/routing/max_vio"] == pytest.approx(0.3)
    assert "train_mean/z_loss" not in results and "train_mean/balance_loss" not in results


def test_steps_to_reference_loss_pairs_variants_by_hand(study_dir):
    run_set = load_runs([study_dir])
    # base's final losses 2.0, 2.2, 2.1 → target 2.1; better logs loss + 0.5 at step 2 (above
    # the target for every seed) and its final loss ≤ 2.1 at step 4.
    target, steps = steps_to_reference_loss(run_set, "better", "base")
    assert target == pytest.approx(2.1) and steps == {0: 4, 1: 4, 2: 4}
    # better's mean final loss 1.8833 is below every base loss: never reached
    target, steps = steps_to_reference_loss(run_set, "base", "better")
    assert target == pytest.approx((1.8 + 1.95 + 1.9) / 3) and steps == {0: None, 1: None, 2: None}
    with pytest.raises(RunDataError, match="'unstable'"):
        steps_to_reference_loss(run_set, "base", "unstable")


def test_report_has_every_section_valid_images_and_model_cards(study_dir, tmp_path):
    files = build_report([study_dir], tmp_path / "report")
    markdown = files.markdown.read_text()
    for heading in (
        "## Summary",
        "## Runs",
        "## Ablation table",
        "## Against the baseline",
        "## Efficiency",
        "## Loss curves",
        "## Routing over training",
        "## Schedules",
        "## Expert utilisation",
        "## Per-task accuracy",
        "## Model cards and reproducibility",
        "### Model card: better__seed1",
        "#### Reproducibility: base__seed0",
    ):
        assert heading in markdown, heading
    assert "*No " not in markdown  # every section had its data
    names = {p.name for p in files.figures}
    assert names == {
        "loss_curves.png",
        "routing.png",
        "schedules.png",
        "expert_utilisation.png",
        "task_accuracy.png",
    }
    html = files.html.read_text()
    inlined = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(inlined) == len(files.figures) and 'src="figures/' not in html
    for figure in files.figures:
        data = figure.read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        image = imread(figure)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert base64.b64encode(data).decode() in inlined
        assert f"](figures/{figure.name})" in markdown

    # Target loss defaults to the baseline's mean final validation loss (2.1).
    assert "Target validation loss 2.1." in markdown
    # CTGI of 'better' vs 'base' on held-out tasks with U = 1 (DESIGN.md §7), its paired
    # interval over the (seed, example) pairs, and TR = mean held-out / mean in-domain gain.
    gains = [(0.6 - 0.2) / (1 - 0.2), (0.55 - 0.4) / (1 - 0.4)]
    expected = _pooled_ctgi("better", "base")
    assert expected.value == pytest.approx(np.mean(gains))
    heldout_gain, indomain_gain = (0.4 + 0.15) / 2, (0.05 + 0.05) / 2
    assert (
        f"| better | base | 0,1,2 | {heldout_gain:+.3f} | {indomain_gain:+.3f} | "
        f"{expected.value:+.3f} [{expected.ci_low:+.3f}, {expected.ci_high:+.3f}] | "
        f"{heldout_gain / indomain_gain:.4g} | none |"
    ) in markdown
    # Model cards: one per run with a config; failure modes found in the logs.
    assert {p.name for p in files.model_cards} == {
        f"{v}__seed{s}.md" for v in VAL_LOSS for s in range(3)
    } | {"unstable__seed0.md"}
    card = (tmp_path / "report/model_cards/better__seed1.md").read_text()
    assert "routing_collapse" in card and "1,000 total / 600 active" in card
    assert "moealign train --config configs/tiny.toml" in card and "abc1234" in card
    dead_card = (tmp_path / "report/model_cards/base__seed2.md").read_text()
    assert "first at step 3" in dead_card and "(1, 3)" in dead_card
    assert "diverged: non-finite loss first logged at step 3" in markdown
    assert "ValueError: bad data" in markdown


def _pooled_ctgi(variant, baseline):
    """ctgi() on each held-out task's answers concatenated over seeds 0–2, paired by seed."""
    pooled = {
        name: {
            task: np.concatenate([correct_array(HELDOUT[name][task], seed) for seed in range(3)])
            for task in HELDOUT[name]
        }
        for name in (variant, baseline)
    }
    return ctgi(pooled[variant], pooled[baseline], upper_bound=1.0, min_headroom=0.01)


def test_per_variant_baselines_drive_the_paired_table_and_ctgi(study_dir, tmp_path):
    study = json.loads((study_dir / "study.json").read_text())
    study |= {"baseline": "better", "baselines": {"better": "base"}}
    (study_dir / "study.json").write_text(json.dumps(study))
    run_set = load_runs([study_dir])
    assert run_set.baseline_of("better", "better") == "base"
    assert run_set.baseline_of("base", "better") == "better"
    rows = {row[0]: row for row in transfer_table(run_set, "better").rows}
    assert set(rows) == {"base", "better"}  # unstable/broken have no answers
    for variant, baseline in (("better", "base"), ("base", "better")):
        expected = _pooled_ctgi(variant, baseline)
        assert rows[variant][1] == baseline and rows[variant][2] == "0,1,2"
        assert rows[variant][5] == (
            f"{expected.value:+.3f} [{expected.ci_low:+.3f}, {expected.ci_high:+.3f}]"
        )
    # base vs better: gains (0.2 − 0.6)/(1 − 0.6) and (0.4 − 0.55)/(1 − 0.55).
    assert _numbers(rows["base"][5])[0] == pytest.approx(np.mean([-1.0, -0.15 / 0.45]), abs=5e-4)
    deltas = {row[0]: row for row in baseline_table(run_set, "better", ["val_loss"]).rows}
    assert deltas["better"][1] == "base" and deltas["base"][1] == "better"
    assert _numbers(deltas["base"][2])[0] == pytest.approx(2.1 - 1.8833333, abs=1e-3)


def test_mismatched_examples_are_reported_not_paired(study_dir):
    run_dir = study_dir / "better__seed0"
    final = json.loads((run_dir / "final_eval.json").read_text())
    final["tasks"]["sets"]["heldout_tasks"]["tasks"]["min"]["references"][0] = "other"
    (run_dir / "final_eval.json").write_text(json.dumps(final))
    rows = {row[0]: row for row in transfer_table(load_runs([study_dir]), "base").rows}
    assert "seed 0, task 'min'" in rows["better"][-1] and rows["better"][5] == "–"


def test_missing_data_leaves_sections_out_with_a_note(tmp_path):
    run = tmp_path / "bare"
    write_run(run, seed=0, val_loss=2.0)
    (run / "metrics.jsonl").unlink()
    (run / "final_eval.json").unlink()
    files = build_report([run], tmp_path / "out", metrics=["val_loss", "nonexistent"])
    markdown = files.markdown.read_text()
    assert "No run has any of the requested metrics." in markdown
    assert "Not found in any run: val_loss, nonexistent." in markdown
    assert "No finished run logged loss, val_loss." in markdown
    assert "No final evaluation recorded expert_counts." in markdown
    assert "No final evaluation has task accuracies." in markdown
    assert files.figures == [] and "<img" not in files.html.read_text()
    with pytest.raises(RunDataError, match="expected a run directory"):
        build_report([tmp_path / "out"], tmp_path / "out2")
    with pytest.raises(RunDataError, match="'nope'"):
        build_report([run], tmp_path / "out3", baseline="nope")


def test_report_of_a_real_tiny_run_through_the_cli(tmp_path, capsys):
    overrides = [
        "train.steps=3",
        "optim.warmup_steps=1",
        "train.log_every=1",
        "train.eval_every=1",
        "data.source=tasks",
        "data.examples_per_task=10",
        "train.device=cpu",
    ]
    run_dir = tmp_path / "real"
    Trainer(load_config(CONFIGS / "tiny.toml", overrides), run_dir=run_dir, progress=False).train()
    final = json.loads((run_dir / "final_eval.json").read_text())
    assert (
        0 < final["peak_memory_bytes"] <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    # The recorded expert loads are the ones the final MaxVio was computed from.
    counts_LE = np.asarray(final["expert_counts"])
    assert counts_LE.shape == (2, 4) and counts_LE.sum() > 0
    max_vio_L = (counts_LE.max(1) - counts_LE.mean(1)) / counts_LE.mean(1)
    assert final["val_routing/max_vio"] == pytest.approx(max_vio_L.mean(), rel=1e-6)
    assert main(["report", str(run_dir)]) == 0
    assert "1 model cards" in capsys.readouterr().out
    markdown = (run_dir / "report/report.md").read_text()
    assert "| real | 1/1 |" in markdown
    assert (run_dir / "report/figures/expert_utilisation.png").read_bytes()[:8] == PNG_SIGNATURE


def test_compare_prints_both_runs_config_differences_and_deltas(tmp_path, capsys):
    write_run(tmp_path / "a", seed=0, val_loss=2.0)
    write_run(tmp_path / "b", seed=1, val_loss=1.75)
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert f"A: {tmp_path / 'a'} (finished)" in out and f"B: {tmp_path / 'b'} (finished)" in out
    assert re.search(r"train\.seed\s+0\s+1", out)
    assert re.search(r"val_loss ↓\s+2\s+1\.75\s+-0\.25", out)
    assert "layer" not in out
    assert compare_runs(tmp_path / "a", tmp_path / "a").count("(none)") == 1
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "missing")]) == 2
    assert "expected a run directory" in capsys.readouterr().err
