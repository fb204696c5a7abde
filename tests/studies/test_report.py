"""Reports: ablation statistics against scipy, every section and figure, model cards, compare."""

from __future__ import annotations

import base64
import json
import math
import re
import resource
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from scipy import stats as scipy_stats

from helpers_browser import find_chromium, measure_page
from helpers_cli import CONFIGS
from moealign.cli import main
from moealign.config import load_config
from moealign.evaluation.ctgi import ctgi
from moealign.evaluation.verdicts import format_p, holm_adjust
from moealign.studies import plots
from moealign.studies.labels import metric_label
from moealign.studies.plots import ema
from moealign.studies.report import (
    ablation_table,
    baseline_table,
    best_marks,
    build_report,
    compare_text,
    comparison,
    metric_direction,
    transfer_table,
)
from moealign.studies.results import (
    RunDataError,
    RunRecord,
    RunSet,
    load_run,
    load_runs,
    run_results,
    steps_to_reference_loss,
    time_to_target,
)
from moealign.tables import format_interval
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


def _numbers(text) -> list[float]:
    text = str(text).replace(",", "")
    return [float(x) for x in re.findall(r"[-+]?\d+\.?\d*(?:e[-+]?\d+)?", text)]


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
        # base 2.1 ± 0.248 -> "2.10 ± 0.25"; better 1.883 ± 0.190 -> "1.88 ± 0.19"
        assert str(rows[variant][2]) == format_interval(np.mean(losses), (high - low) / 2)
        assert rows[variant][1] == "3/3"
    assert str(rows["base"][2]) == "2.10 ± 0.25" and str(rows["better"][2]) == "1.88 ± 0.19"
    assert [str(c) for c in rows["unstable"][1:3]] == ["0/1 (1 diverged)", "–"]
    assert rows["broken"][1] == "0/1 (1 failed)"
    # Lower loss is better: 'better' has the best mean, but [1.69, 2.07] overlaps base's
    # [1.85, 2.35], so it is marked italic (not shown to be best), not bold.
    assert rows["better"][2].emphasis == "em" and rows["base"][2].emphasis == ""
    assert all(row[3].emphasis == "" for row in table.rows)  # every tokens/s equal: none best
    assert table.headers[2].text == "validation loss (nats/token) ↓"
    assert table.headers[2].title == "val_loss"

    deltas = {row[0]: row for row in baseline_table(run_set, "base", ["val_loss"]).rows}
    reference = scipy_stats.ttest_rel(VAL_LOSS["better"], VAL_LOSS["base"])
    difference = np.subtract(VAL_LOSS["better"], VAL_LOSS["base"])
    assert deltas["better"][1] == "base"
    t_critical = scipy_stats.t.ppf(0.975, 2)
    half_width = t_critical * scipy_stats.sem(difference)
    assert deltas["better"][2] == (
        f"{format_interval(difference.mean(), half_width, signed=True)} "
        f"(p={reference.pvalue:.3f}, n=3): lower (better)"
    )
    assert deltas["better"][2] == "-0.217 ± 0.072 (p=0.006, n=3): lower (better)"  # t = −13.0
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
        "<details><summary>Reproducibility: command, versions, hardware, wall time</summary>",
        "<details><summary>Resolved config (config.json)</summary>",
    ):
        assert heading in markdown, heading
    headings = re.findall(r"^#+ .*$", markdown, re.M)
    assert len(headings) == len(set(headings)), "a section heading appears twice"
    assert "n = 2 seeds" not in markdown  # 3 seeds each: no few-seeds note
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
    # interval over the (seed, example) pairs, beside the plain held-out gain and its interval
    # from the same resamples, and TR = mean held-out / mean in-domain gain.
    gains = [(0.6 - 0.2) / (1 - 0.2), (0.55 - 0.4) / (1 - 0.4)]
    expected = _pooled_ctgi("better", "base")
    assert expected.value == pytest.approx(np.mean(gains))
    heldout_gain, indomain_gain = (0.4 + 0.15) / 2, (0.05 + 0.05) / 2
    assert expected.accuracy_gain == pytest.approx(heldout_gain)
    assert expected.warning is None  # headrooms 80 and 60 points
    gain_p, ctgi_p = holm_adjust([expected.gain_comparison.p_value, expected.comparison.p_value])
    assert (
        f"| better | base | 0,1,2 | {heldout_gain:+.3f} "
        f"[{expected.gain_ci_low:+.3f}, {expected.gain_ci_high:+.3f}]: "
        f"{expected.gain_comparison.describe('higher')} "
        f"({format_p(expected.gain_comparison.p_value)}, Holm {format_p(gain_p)}) | "
        f"{indomain_gain:+.3f} | "
        f"{expected.value:+.3f} [{expected.ci_low:+.3f}, {expected.ci_high:+.3f}]: "
        f"{expected.comparison.describe('higher')} "
        f"({format_p(expected.comparison.p_value)}, Holm {format_p(ctgi_p)}) | "
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
    """ctgi() on each held-out task's answers, one row per seed 0–2 (each seed its own
    examples: the nested hierarchical bootstrap)."""
    pooled = {
        name: {
            task: np.stack([correct_array(HELDOUT[name][task], seed) for seed in range(3)])
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
        assert rows[variant][5].startswith(
            f"{expected.value:+.3f} [{expected.ci_low:+.3f}, {expected.ci_high:+.3f}]: "
            f"{expected.comparison.describe('higher')} ({format_p(expected.comparison.p_value)}, "
            "Holm p"
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
    assert main(["report", str(run_dir), "--json"]) == 0
    out, err = capsys.readouterr()
    assert "1 model cards" in err
    files = json.loads(out)["files"]
    assert files["markdown"] == str(run_dir / "report/report.md")
    assert files["html"] == str(run_dir / "report/report.html")
    assert str(run_dir / "report/figures/expert_utilisation.png") in files["figures"]
    assert len(files["model_cards"]) == 1 and Path(files["model_cards"][0]).is_file()
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
    assert "every difference is inconclusive" in out
    assert compare_text(comparison(tmp_path / "a", tmp_path / "a")).count("(none)") == 1
    # --json: one document on stdout, the table on stderr
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--json"]) == 0
    out, err = capsys.readouterr()
    document = json.loads(out)
    assert document["command"] == "compare" and "config differences" in err
    result = document["result"]
    assert result["a"] == {"path": str(tmp_path / "a"), "status": "finished"}
    assert result["config_differences"]["train.seed"] == {"a": 0, "b": 1}
    assert result["metrics"]["val_loss"] == {"a": 2.0, "b": 1.75, "difference": -0.25}
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "missing")]) == 2
    assert "expected a run directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("intervals", "direction", "expected"),
    [
        # lower is better; [1.0, 1.2] is clear of [1.5, 1.7]: bold
        ([(1.6, 0.1), (1.1, 0.1), (2.0, 0.1)], "lower", {1: "strong"}),
        # [1.0, 1.6] overlaps the runner-up's [1.5, 1.7]: not shown to be best
        ([(1.6, 0.1), (1.3, 0.3), (2.0, 0.1)], "lower", {1: "em"}),
        ([(1.6, 0.1), (1.1, 0.1)], "higher", {0: "strong"}),
        ([(1.6, math.nan), (1.1, 0.1)], "higher", {0: "em"}),  # one seed: no interval
        ([(1.1, 0.0), (1.1, 0.0), (2.0, 0.0)], "lower", {0: "em", 1: "em"}),  # a tie
        ([(1.0, 0.1), (1.0, 0.1)], "lower", {}),  # nothing to choose between
        ([(1.0, 0.1), (2.0, 0.1)], None, {}),  # no direction
        ([(math.nan, math.nan), (2.0, 0.1), (3.0, 0.1)], "lower", {1: "strong"}),
    ],
)
def test_best_mark_only_where_the_intervals_separate(intervals, direction, expected):
    assert best_marks(intervals, direction) == expected


def test_metric_labels_are_human_readable_with_units():
    assert metric_label("val_loss") == "validation loss (nats/token)"
    assert metric_label("val_routing/max_vio") == "validation MaxVio, global"
    assert (
        metric_label("val_routing/usage_entropy") == "validation expert-usage entropy (H / log E)"
    )
    assert metric_label("train_mean/routing/max_vio") == "MaxVio, batch (training mean)"
    assert metric_label("routing/token_entropy") == "token routing entropy (H / log E)"
    assert metric_label("task_accuracy/heldout/mean") == "held-out-task accuracy (0–1)"
    assert metric_label("task_accuracy/seen/copy") == "copy (seen-task) (0–1)"
    assert metric_label("routing/layer1/dead_experts") == "dead experts, layer 1 (per layer)"
    assert metric_label("peak_memory_mib") == "peak memory (MiB)"
    assert metric_label("some/new_key") == "some / new key"  # unknown keys still read


def test_ema_matches_pandas_and_keeps_the_first_value():
    pandas = pytest.importorskip("pandas")
    values = np.array([[5.0, 4.0, 4.5, 3.0, 3.2, 2.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    for span in (1.0, 2.0, 3.7):
        expected = [
            pandas.Series(row).ewm(span=span, adjust=True).mean().to_numpy() for row in values
        ]
        np.testing.assert_allclose(ema(values, span), expected, rtol=1e-12)
    assert ema(values, 3.0)[:, 0].tolist() == values[:, 0].tolist()
    np.testing.assert_array_equal(ema(values, 1.0), values)  # α = 1: no smoothing


def test_figures_fit_the_page_in_a_grid(study_dir, tmp_path):
    files = build_report([study_dir], tmp_path / "report")
    width = round(plots.MAX_WIDTH_IN * plots.DPI)
    routing = imread(tmp_path / "report/figures/routing.png")
    loss = imread(tmp_path / "report/figures/loss_curves.png")
    # 4 routing panels in 2 rows of 2: as wide as the page column, about twice as tall as the
    # one-row loss figure
    assert routing.shape[1] == loss.shape[1] == width
    assert routing.shape[0] > 1.7 * loss.shape[0]
    html = files.html.read_text()
    assert 'title="val_routing/max_vio"' in html and "validation MaxVio, global" in html


def test_all_zero_task_accuracy_is_a_note_not_an_empty_chart(study_dir, tmp_path):
    for run_dir in study_dir.glob("*__seed*"):
        final_path = run_dir / "final_eval.json"
        if final_path.exists():
            final = json.loads(final_path.read_text())
            final["task_accuracy"]["heldout"] = dict.fromkeys(
                final["task_accuracy"]["heldout"], 0.0
            )
            final_path.write_text(json.dumps(final))
    files = build_report([study_dir], tmp_path / "report")
    markdown = files.markdown.read_text()
    assert "*Every held-out-task accuracy is 0, for every variant: nothing to chart.*" in markdown
    assert "task_accuracy.png" in {p.name for p in files.figures}  # the seen tasks still drawn
    for run_dir in study_dir.glob("*__seed*"):
        final_path = run_dir / "final_eval.json"
        if final_path.exists():
            final = json.loads(final_path.read_text())
            final["task_accuracy"]["seen"] = dict.fromkeys(final["task_accuracy"]["seen"], 0.0)
            final_path.write_text(json.dumps(final))
    files = build_report([study_dir], tmp_path / "report2")
    assert "Every seen-task and held-out-task accuracy is 0" in files.markdown.read_text()
    assert "task_accuracy.png" not in {p.name for p in files.figures}


# --- the HTML report in a real headless browser ------------------------------------------------

VIEWPORT = 1400  # CSS pixels, a common laptop width


def _check_layout(html_path, fit_headings=()):
    """Open the report in headless Chromium at VIEWPORT px: the page never scrolls sideways,
    every table sits in a container that scrolls, every image loaded and fits; the tables
    under ``fit_headings`` fit without scrolling at all."""
    if find_chromium() is None:
        pytest.skip("no chromium on PATH: install Debian's chromium (scripts/setup.sh does)")
    layout = measure_page(html_path, width=VIEWPORT)
    assert layout["innerWidth"] == VIEWPORT
    assert layout["scrollWidth"] <= layout["clientWidth"], "the page scrolls sideways"
    assert layout["tables"] and layout["images"]
    for table in layout["tables"]:
        assert table["container"] == "table-scroll" and table["overflowX"] in ("auto", "scroll")
        assert 0 <= table["left"] and table["right"] <= layout["clientWidth"]
        if table["heading"].startswith(fit_headings):
            assert table["tableWidth"] <= table["containerWidth"], table["heading"]
    for image in layout["images"]:
        assert image["complete"] and image["naturalWidth"] > 0, image["alt"]
        assert image["right"] <= layout["clientWidth"]
    return layout


def test_report_in_a_headless_browser_hand_written_study(study_dir, tmp_path):
    files = build_report([study_dir], tmp_path / "report")
    layout = _check_layout(files.html, ("Ablation table", "Against the baseline"))
    assert len(layout["images"]) == len(files.figures) == 5


@pytest.mark.slow
def test_report_of_a_real_tiny_study_in_a_headless_browser(tmp_path):
    """2 routers × 2 seeds trained for a few steps, reported, opened at 1400 px."""
    overrides = [
        "train.steps=8",
        "optim.warmup_steps=1",
        "train.log_every=1",
        "train.eval_every=4",
        "train.eval_batches=1",
        "train.checkpoint_every=0",
        "train.task_eval_examples=1",
        "data.source=tasks",
        "data.examples_per_task=10",
        "train.device=cpu",
    ]
    root, cells = tmp_path / "study", []
    for seed in (0, 1):
        for router in ("softmax_topk", "mpi"):
            variant = f"router={router}"
            run_dir = root / f"{variant}__seed{seed}"
            config = load_config(
                CONFIGS / "tiny.toml", [*overrides, f"model.router={router}", f"train.seed={seed}"]
            )
            Trainer(config, run_dir=run_dir, progress=False).train()
            cells.append(
                {"cell": run_dir.name, "variant": variant, "seed": seed, "run_dir": str(run_dir)}
            )
    study = {"name": "tiny", "baseline": "router=softmax_topk", "cells": cells}
    (root / "study.json").write_text(json.dumps(study))
    files = build_report([root], tmp_path / "report")
    layout = _check_layout(files.html, ("Ablation table", "Against the baseline", "Efficiency"))
    html = files.html.read_text()
    headings = re.findall(r"<h[1-6]>([^<]*)</h[1-6]>", html)
    assert len(headings) == len(set(headings)), "a section heading appears twice"
    # The method note: words and a MathML formula, no raw t_{...} notation.
    assert '<math display="block">' in html and "t_{" not in html
    assert html.count("Some cells rest on n = 2 seeds: their 95% interval is ±9.0 s") == 2
    # Each run's resolved config is folded: its JSON sits only inside a <details>.
    folded = re.findall(r"<details><summary>Resolved config \(config.json\)</summary>", html)
    assert len(folded) == 4
    dumped = [m.start() for m in re.finditer("&quot;d_model&quot;: ", html)]
    assert len(dumped) == 4 and all(
        html.rfind("<details>", 0, i) > html.rfind("</details>", 0, i) for i in dumped
    )
    # The same content unfolded (every <details> open, as the page was before folding) is at
    # least twice as tall: measured 14,031 px unfolded vs 5,784 px folded at 1400 px.
    unfolded = measure_page(files.html, width=VIEWPORT, open_details=True)
    assert layout["scrollHeight"] <= 0.5 * unfolded["scrollHeight"], (
        layout["scrollHeight"],
        unfolded["scrollHeight"],
    )


def test_routing_statistics_change_from_step_0():
    """λ of an MPI router is high at initialisation already (its power step): the report
    reads the change from the step-0 evaluation, by hand here."""
    step0 = {
        "val_routing/projection_alignment": 0.79,
        "val_routing/layer0/projection_alignment": 0.8,
    }
    later = {"val_routing/projection_alignment": 0.81}
    run = RunRecord(
        Path("mpi"), "mpi", 0, "finished",
        metrics=[{"split": "val", "step": 0, **step0}, {"split": "val", "step": 50, **later}],
        final_eval={"val_routing/projection_alignment": 0.83, "val_loss": 2.0},
    )  # fmt: skip
    results = run_results(run)
    assert results["step0/val_routing/projection_alignment"] == 0.79
    change = results["change_from_step0/val_routing/projection_alignment"]
    assert change == pytest.approx(0.04)
    assert not any("layer0" in key and "step0" in key for key in results)  # layer means only
    assert not any(key.startswith("change_from_step0/val_loss") for key in results)
    label = metric_label("change_from_step0/val_routing/projection_alignment")
    assert label == "validation projection alignment λ, change from step 0"
    no_step0 = RunRecord(Path("r"), "r", 0, "finished", final_eval=run.final_eval)
    assert not any(key.startswith("step0/") for key in run_results(no_step0))


def test_few_seeds_note_uses_the_t_quantiles():
    """t_{0.975,1} = 12.706, t_{0.975,2} = 4.303, t_{0.975,4} = 2.776 (printed tables): the
    half widths in units of s are 12.706/√2 = 8.98, 4.303/√3 = 2.48 and 2.776/√5 = 1.24."""
    from moealign.studies.report import _few_seeds_note, _interval_factor

    assert _interval_factor(2) == pytest.approx(12.7062 / math.sqrt(2), rel=1e-4)
    assert _interval_factor(3) == pytest.approx(4.3027 / math.sqrt(3), rel=1e-4)
    note = _few_seeds_note({2, 3})
    assert "±9.0 s (t = 12.7 with 1 degree of freedom)" in note.text
    assert "3 seeds give ±2.5 s, 5 seeds ±1.2 s" in note.text
    assert _few_seeds_note({1, 3, 5}) is None and _few_seeds_note(set()) is None


def test_baseline_table_holm_adjusts_its_tests_and_names_four_outcomes():
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    losses = {
        "base": [2.00, 2.10, 2.05],
        "lower": [1.80, 1.91, 1.84],  # about −0.2 on every seed
        "same": [2.001, 2.099, 2.0505],  # within ±0.002 of base
        "noisy": [1.90, 2.30, 1.95],  # differences of both signs
    }
    accuracy = {"base": [0.5, 0.6, 0.55], "lower": [0.52, 0.6, 0.58]}
    accuracy |= {"same": [0.5, 0.6, 0.55], "noisy": [0.4, 0.7, 0.5]}
    run_set = RunSet(
        [
            RunRecord(Path(f"{variant}__seed{seed}"), variant, seed, "finished",
                      final_eval={"val_loss": loss, "acc": accuracy[variant][seed]})
            for variant, values in losses.items()
            for seed, loss in enumerate(values)
        ]
    )  # fmt: skip
    table = baseline_table(run_set, "base", ["val_loss", "acc"], margins={"acc": 0.05})
    rows = {row[0]: row for row in table.rows}
    raw = [
        scipy_stats.ttest_rel(values, losses["base"]).pvalue
        for values in (losses["lower"], losses["same"], losses["noisy"])
    ]
    raw_accuracy = [
        scipy_stats.ttest_rel(accuracy[v], accuracy["base"]).pvalue for v in ("lower", "noisy")
    ]  # "same" has every difference 0: no p-value, left out of the family
    order = [raw[0], raw_accuracy[0], raw[1], raw[2], raw_accuracy[1]]
    holm = multitest.multipletests(order, method="holm")[1]
    assert f"Holm p={holm[0]:.3f}" in rows["lower"][2] and rows["lower"][2].endswith(
        "lower (better)"
    )
    assert rows["same"][2].endswith("equivalent within ±0.01")  # val_loss default margin
    assert rows["same"][3].endswith("equivalent within ±0.05")  # acc: --margin acc=0.05
    assert "p=n/a" in rows["same"][3]
    assert f"Holm p={holm[3]:.3f}" in rows["noisy"][2]
    assert rows["noisy"][2].endswith("inconclusive") and rows["noisy"][3].endswith("inconclusive")


@pytest.mark.slow
def test_report_cli_takes_equivalence_margins(study_dir, tmp_path, capsys):
    out = tmp_path / "report"
    args = ["report", str(study_dir), "--out", str(out), "--metrics", "val_loss"]
    assert main([*args, "--margin", "val_loss=0.5"]) == 0
    markdown = (out / "report.md").read_text()
    assert "val_loss: ±0.5" in markdown and "lower (better)" in markdown
    assert main([*args, "--margin", "val_loss"]) == 2
    assert "METRIC=M" in capsys.readouterr().err
