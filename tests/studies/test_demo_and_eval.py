"""The main job (`moealign demo`: seeds, intervals, paired tests, verdicts) and
`moealign eval RUN_DIR`, end to end on tiny models."""

import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import scipy.stats

from helpers_cli import run_cli
from moealign.config import load_config
from moealign.evaluation.run import evaluate_run
from moealign.studies.crossover import (
    crossing,
    curve_crossings,
    format_tokens,
    tokens_per_expert,
)
from moealign.studies.demo import (
    COMPARISONS,
    VARIANTS,
    budget_paragraphs,
    crossovers,
    demo_config_path,
    paired_comparisons,
    run_demo,
    variant_configs,
    verdict,
)
from moealign.studies.results import RunRecord, RunSet

TINY_DEMO = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.n_experts=4",
    "model.expert_d_ff=32",
    "model.max_seq_len=128",
    "data.examples_per_task=40",
    "data.text_max_bytes=1000000",
    "train.seq_len=96",
    "train.batch_size=8",
    "train.steps=4",
    "train.eval_every=2",
    "train.eval_batches=1",
    "train.log_every=1",
    "train.checkpoint_every=0",
    "train.task_eval_examples=1",
    "optim.warmup_steps=1",
]


def test_variants_have_matched_active_size():
    base = load_config(None, ["model.ffn=moe", "model.top_k=2", "model.expert_d_ff=64"])
    variants = variant_configs(base)
    assert variants["dense"].model.ffn == "dense" and variants["dense"].model.d_ff == 128
    assert variants["moe_mpi"].model.router == "mpi"
    assert variants["moe_softmax_topk"].model.router == "softmax_topk"


def _runs(values: dict[str, list[float]]) -> RunSet:
    """Finished runs whose final evaluation holds only ``val_loss``, seeds 0, 1, ..."""
    return RunSet(
        [
            RunRecord(Path(f"{variant}__seed{seed}"), variant, seed, "finished",
                      final_eval={"val_loss": value})
            for variant, losses in values.items()
            for seed, value in enumerate(losses)
        ]
    )  # fmt: skip


def test_paired_comparisons_match_scipy_with_holm_and_four_outcomes():
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    dense = [2.00, 2.10, 2.05, 1.98]
    topk = [1.90, 1.99, 1.96, 1.87]  # about 0.1 lower on every seed
    mpi = [1.93, 1.95, 1.98, 1.86]  # topk ± 0.03: neither lower nor within ±0.01
    values = {"dense": dense, "moe_softmax_topk": topk, "moe_mpi": mpi}
    found = paired_comparisons(_runs(values))
    comparisons = {(c["variant"], c["baseline"]): c for c in found}
    assert set(comparisons) == set(COMPARISONS)
    raw = []
    for (variant, baseline), comparison in comparisons.items():
        a, b = values[variant], values[baseline]
        difference = np.subtract(a, b)
        half_width = scipy.stats.t.ppf(0.975, 3) * difference.std(ddof=1) / 2
        assert comparison["delta"] == pytest.approx(difference.mean())
        assert comparison["half_width"] == pytest.approx(half_width)
        assert comparison["p_value"] == pytest.approx(scipy.stats.ttest_rel(a, b).pvalue)
        assert comparison["seeds"] == [0, 1, 2, 3] and comparison["margin"] == 0.01
        raw.append(comparison["p_value"])
    holm = multitest.multipletests(raw, method="holm")[1]
    np.testing.assert_allclose([c["p_adjusted"] for c in found], holm)
    assert comparisons[("moe_softmax_topk", "dense")]["outcome"] == "lower"
    assert comparisons[("moe_mpi", "moe_softmax_topk")]["outcome"] == "inconclusive"
    lines = {pair: verdict(c) for pair, c in comparisons.items()}
    assert lines[("moe_softmax_topk", "dense")].endswith("moe_softmax_topk lower (better)")
    assert lines[("moe_mpi", "moe_softmax_topk")].endswith("inconclusive (neither a difference "
                                                           "nor equivalence shown)")  # fmt: skip
    assert "n = 4 seeds" in lines[("moe_mpi", "dense")] and "Holm p" in lines[("moe_mpi", "dense")]
    # A wide margin makes the MPI − top-k difference (|Δ| ≤ 0.03, tight) equivalent.
    wide = {
        (c["variant"], c["baseline"]): c
        for c in paired_comparisons(_runs(values), margins={"val_loss": 0.2})
    }
    assert wide[("moe_mpi", "moe_softmax_topk")]["outcome"] == "equivalent"
    assert verdict(wide[("moe_mpi", "moe_softmax_topk")]).endswith("equivalent within ±0.2")
    # A higher loss is worse; a seed one model lacks is left out of the pairing.
    worse = _runs({"dense": dense, "moe_softmax_topk": [x + 0.2 for x in dense[:3]]})
    (comparison,) = [c for c in paired_comparisons(worse) if c["baseline"] == "dense"]
    assert comparison["seeds"] == [0, 1, 2]
    assert verdict(comparison).endswith("moe_softmax_topk higher (worse)")


def test_crossing_is_the_last_sign_change_interpolated_between_evaluations():
    steps = [0, 100, 200, 300, 400]
    dense = [5.5, 3.0, 2.6, 2.4, 2.3]
    # MoE − dense: (init) −0.1, +0.2, +0.1, −0.05, −0.1: below for good between 200 and 300,
    # where the line from (200, +0.1) to (300, −0.05) is 0 at 200 + 100 · 0.1 / 0.15.
    moe = [5.4, 3.2, 2.7, 2.35, 2.2]
    found = crossing(steps, moe, dense)
    assert found.outcome == "crossed"
    assert found.step == pytest.approx(200 + 100 * 0.1 / 0.15)
    assert found.text(tokens_per_step=1000) == "step 267 (267k tokens)"
    # An early dip below that does not last is not the crossing: the last sign change is.
    dip = crossing(steps, [5.4, 2.9, 2.7, 2.35, 2.2], dense)
    assert dip.step == pytest.approx(found.step)
    # Still behind at the last evaluation (a tie counts as behind): no crossing.
    behind = crossing(steps, [5.4, 3.2, 2.5, 2.45, 2.3], dense)
    assert behind.outcome == "not_crossed" and behind.step is None
    assert behind.text(1000) == "no crossing within the budget (400 steps)"
    # Ahead at every evaluation after step 0: nothing to interpolate.
    ahead = crossing(steps, [5.6, 2.9, 2.5, 2.3, 2.2], dense)
    assert ahead.outcome == "ahead_throughout" and ahead.step is None
    assert ahead.text(1000) == "ahead at every evaluation from step 100"
    assert crossing([0], [5.0], [5.1]) is None
    assert tokens_per_expert(716_800, top_k=2, n_experts=8) == 179_200  # the numbers
    assert [format_tokens(t) for t in (1_433_600, 179_200, 640)] == ["1.43M", "179k", "640"]


def _curve_runs(variant: str, curves: list[list[float]], steps: list[int]) -> list[RunRecord]:
    """Finished runs of ``variant``, seeds 0, 1, ..., whose validation records hold ``curves``."""
    return [
        RunRecord(Path(f"{variant}__seed{seed}"), variant, seed, "finished",
                  metrics=[{"step": s, "split": "val", "val_loss": v}
                           for s, v in zip(steps, curve, strict=True)],
                  final_eval={"val_loss": curve[-1]})
        for seed, curve in enumerate(curves)
    ]  # fmt: skip


def test_curve_crossings_average_the_seeds_then_cross_and_report_each_seed():
    steps = [0, 50, 100, 150]
    dense = _curve_runs("dense", [[5.5, 3.0, 2.6, 2.5], [5.5, 3.0, 2.6, 2.5]], steps)
    # seed 0 crosses between 50 and 100, seed 1 between 100 and 150 (MoE − dense: +0.2,
    # −0.1, −0.2 and +0.2, +0.1, −0.1); their mean (+0.2, 0.0, −0.15) crosses at 100 + 0.
    moe = _curve_runs("moe_softmax_topk", [[5.5, 3.2, 2.5, 2.3], [5.5, 3.2, 2.7, 2.4]], steps)
    mean, per_seed = curve_crossings(moe, dense)
    assert mean.step == pytest.approx(100.0)
    assert per_seed[0].step == pytest.approx(50 + 50 * 0.2 / 0.3)
    assert per_seed[1].step == pytest.approx(100 + 50 * 0.1 / 0.2)
    # A seed only one side has is left out; the demo reports steps in tokens too.
    assert set(curve_crossings(moe, dense[:1])[1]) == {0}
    base = load_config(
        demo_config_path(), ["train.steps=150", "train.batch_size=4", "train.seq_len=32"]
    )
    configs = variant_configs(base)
    run_set = RunSet([*dense, *moe, *_curve_runs("moe_mpi", [[5.5, 3.3, 2.9, 2.8]] * 2, steps)])
    rows = {row["variant"]: row for row in crossovers(run_set, configs)}
    assert rows["moe_softmax_topk"]["tokens"] == pytest.approx(100.0 * 4 * 32)
    assert rows["moe_softmax_topk"]["text"] == "step 100 (13k tokens)"
    assert rows["moe_softmax_topk"]["per_seed"]["1"] == "step 125 (16k tokens)"
    assert rows["moe_mpi"]["outcome"] == "not_crossed"
    # Budget text: tokens per expert (K/E of 150 · 128 tokens) and the ranking's dependence.
    comparisons = paired_comparisons(run_set)
    text = " ".join(budget_paragraphs(configs, list(rows.values()), comparisons))
    k, e = base.model.top_k, base.model.n_experts
    assert f"K/E = {k}/{e}" in text and format_tokens(150 * 128 * k / e) in text
    assert "ranking depends on the training budget" in text
    assert "moe_softmax_topk: step 100 (13k tokens)" in text
    assert "moe_mpi: no crossing within the budget (150 steps)" in text
    # Neither MoE is significantly below dense here (seed 0 and 1 disagree): said so.
    assert "No MoE reaches a significant advantage" in text
    better = _curve_runs("moe_softmax_topk", [[5.5, 3.2, 2.4, 2.3], [5.5, 3.2, 2.45, 2.32]], steps)
    comparisons = paired_comparisons(RunSet([*dense, *better]))
    assert "No MoE reaches" not in " ".join(budget_paragraphs(configs, [], comparisons))


def test_the_demo_config_takes_a_short_run_without_refusing_its_warm_up():
    config = load_config(demo_config_path(), ["train.steps=40"])
    assert config.optim.warmup_steps <= 40


def test_demo_refuses_a_bad_margin(tmp_path):
    result = run_cli("demo", "--margin", "val_loss=-1", "--out", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2
    assert "METRIC=M" in result.stderr and "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())


def test_demo_needs_two_distinct_seeds(tmp_path):
    for seeds in (["3"], ["1", "1"]):
        result = run_cli("demo", "--seeds", *seeds, "--out", str(tmp_path), cwd=tmp_path)
        assert result.returncode == 2
        assert "error: --seeds" in result.stderr and "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_demo_trains_each_model_per_seed_reports_intervals_and_reuses_finished_runs(
    tmp_path, capsys
):
    out = tmp_path / "demo"
    summary = run_demo(out, overrides=TINY_DEMO, progress=False, seeds=(0, 1))
    assert [(r["variant"], r["seed"]) for r in summary["runs"]] == [
        (variant, seed) for variant in VARIANTS for seed in (0, 1)
    ]
    runs = {(r["variant"], r["seed"]): r for r in summary["runs"]}
    dense, moe = runs["dense", 0], runs["moe_softmax_topk", 0]
    assert dense["params_total"] == dense["params_active"]
    assert moe["params_active"] < moe["params_total"]
    assert "val_routing/max_vio" not in dense and moe["val_routing/max_vio"] >= 0
    assert 0.0 <= moe["task_accuracy_seen"] <= 1.0
    assert runs["moe_mpi", 0]["val_loss"] != runs["moe_mpi", 1]["val_loss"]  # seeds differ
    # mean ± t half width over the two seeds, by hand
    losses = [runs["moe_mpi", seed]["val_loss"] for seed in (0, 1)]
    statistics = summary["models"]["moe_mpi"]["val_loss"]
    assert statistics["mean"] == pytest.approx(np.mean(losses))
    expected = scipy.stats.t.ppf(0.975, 1) * np.std(losses, ddof=1) / np.sqrt(2)
    assert statistics["half_width"] == pytest.approx(expected) and statistics["n"] == 2
    assert len(summary["verdicts"]) == len(COMPARISONS)
    printed = capsys.readouterr().out
    table = (out / "summary.md").read_text()
    for text in (printed, table):
        assert all(line in text for line in summary["verdicts"])
        assert all(name in text for name in VARIANTS) and " ± " in text
    assert all(f"| {name} |" in table for name in VARIANTS)  # Markdown rows
    # Crossover of each MoE's mean validation curve with the dense one, and the budget text.
    assert [(c["variant"], c["baseline"]) for c in summary["crossovers"]] == [
        ("moe_softmax_topk", "dense"),
        ("moe_mpi", "dense"),
    ]
    assert all(set(c["per_seed"]) == {"0", "1"} for c in summary["crossovers"])
    for text in (printed, table):
        assert "Crossover and budget" in text and all(
            c["text"] in text for c in summary["crossovers"]
        )
        assert all(paragraph in text for paragraph in summary["budget"])
    assert json.loads((out / "summary.json").read_text()) == summary
    assert matplotlib.image.imread(out / "loss_curves.png").shape[-1] in (3, 4)
    before = (out / "moe_mpi__seed1" / "final_eval.json").stat().st_mtime_ns
    assert run_demo(out, overrides=TINY_DEMO, progress=False, seeds=(0, 1)) == summary
    assert (out / "moe_mpi__seed1" / "final_eval.json").stat().st_mtime_ns == before
    # --json (the finished runs reused): the summary as one document on stdout
    sets = [arg for override in TINY_DEMO for arg in ("--set", override)]
    cli = run_cli("demo", "--out", str(out), "--seeds", "0", "1", *sets, "--json", cwd=tmp_path)
    assert cli.returncode == 0, cli.stderr
    document = json.loads(cli.stdout)
    assert document["result"] == json.loads((out / "summary.json").read_text())
    assert document["files"]["plot"] == str(out / "loss_curves.png")
    assert "demo: run 6/6: moe_mpi seed 1" in cli.stderr
    # Another config into the same folder is refused, naming the key, not mixed with old runs.
    other = run_cli(
        "demo",
        "--out",
        str(out),
        "--seeds",
        "0",
        "1",
        *sets,
        "--set",
        "optim.lr=0.002",
        cwd=tmp_path,
    )
    assert other.returncode == 2 and "optim.lr" in other.stderr, other.stderr
    assert (out / "moe_mpi__seed1" / "final_eval.json").stat().st_mtime_ns == before

    # `moealign eval` on one of the runs: same validation loss as the run's own final eval
    result = evaluate_run(out / "moe_mpi__seed0", task_examples=1)
    final = json.loads((out / "moe_mpi__seed0" / "final_eval.json").read_text())
    assert result["val_loss"] == pytest.approx(final["val_loss"], rel=1e-5)
    key = "val_routing/layer1/projection_alignment"
    assert result[key] == pytest.approx(final[key])
    assert set(result["tasks"]["sets"]) >= {"test", "heldout_tasks"}
    written = json.loads((out / "moe_mpi__seed0" / "eval.json").read_text())
    assert (
        written["val_loss"] == result["val_loss"]
        and written["expert_counts"] == (final["expert_counts"])
    )
    cli = run_cli(
        "eval", str(out / "moe_mpi__seed0"), "--task-examples", "1", "--json", cwd=tmp_path
    )
    assert cli.returncode == 0, cli.stderr
    document = json.loads(cli.stdout)  # nothing but the document on stdout
    assert document["result"] == json.loads((out / "moe_mpi__seed0" / "eval.json").read_text())
    assert "eval: validation batches (1)" in cli.stderr and "val loss" in cli.stderr
    assert "val perplexity" in cli.stderr and "projection alignment" in cli.stderr


def test_eval_of_a_directory_without_a_run_is_a_clear_error(tmp_path):
    result = run_cli("eval", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2
    assert "no config.json" in result.stderr and "Traceback" not in result.stderr
