"""The main job, ``moealign demo``: dense vs softmax top-k MoE vs MPI MoE over several seeds.

Trains three models of matched *active* size from ``configs/demo.toml`` (a dense SwiGLU
baseline with FFN width K·F, a softmax top-k MoE and the same MoE with the MPI router, DESIGN.md
§3) on a mix of the Python standard library's sources and the synthetic task suite, once per
seed (``train.seed``: the initialisation and the routers' noise; the data and its order are the
same for every run, so runs of one seed are paired). It reports (DESIGN.md §7–8):

* per model and column, the mean over seeds ± the 95% Student-t half width
  (:func:`moealign.evaluation.stats.mean_confidence_interval`);
* for each MoE against softmax top-k and against dense, the paired difference by seed with its
  95% t interval, the two-sided paired t-test p-value and its Holm-adjusted value over the
  table's tests, and the outcome (:mod:`moealign.evaluation.verdicts`): lower / higher,
  equivalent within ±m (TOST; m = 0.01 nats for the loss, 1 point for accuracies, or
  ``--margin METRIC=M``) or inconclusive;
* one verdict line per comparison on the validation loss, in those four outcomes;
* where each MoE's seed-mean validation curve overtakes the dense one, as a step and in tokens
  (interpolated between evaluations, :mod:`moealign.studies.crossover`), per seed too, the
  tokens one expert has seen against the dense FFN, and that the ranking depends on the budget;
* training and validation loss curves, the mean over seeds with a min–max band.

Everything goes to the terminal and to ``summary.md``/``summary.json``/``loss_curves.png`` in
the output directory. A run that already finished there is reused, so an interrupted demo
continues where it stopped.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moealign.config import ConfigError, RunConfig, load_config
from moealign.io import atomic_write_json, atomic_write_text
from moealign.progress import write as write_progress
from moealign.studies.document import Image, Note, Paragraph, Section, to_markdown
from moealign.tables import Table, format_number, to_text

if TYPE_CHECKING:
    from moealign.studies.results import RunRecord, RunSet

PRESETS = {
    # three seeds of three models within 15 minutes on two CPU cores (docs/demo.md)
    "quick": [],
    # a longer, wider run for a GPU (~15 hours of one CPU core, docs/demo.md)
    "full": [
        "model.d_model=256",
        "optim.lr=3e-3",
        "model.n_layers=6",
        "model.expert_d_ff=256",
        "model.n_experts=16",
        "train.steps=3000",
        "train.batch_size=32",
        "train.eval_every=100",
        "train.checkpoint_every=500",
        "train.task_eval_examples=50",
    ],
}
VARIANTS = ("dense", "moe_softmax_topk", "moe_mpi")
DEFAULT_SEEDS = (0, 1, 2)
CONFIDENCE = 0.95
# Columns of the results table (keys of moealign.studies.results.run_results).
METRICS = (
    "val_loss",
    "val_ppl",
    "task_accuracy_seen",
    "task_accuracy_heldout",
    "val_routing/max_vio",
    "tokens_per_s",
)
# Paired differences: each MoE against softmax top-k and against dense.
COMPARISONS = (("moe_softmax_topk", "dense"), ("moe_mpi", "dense"), ("moe_mpi", "moe_softmax_topk"))
DIFFERENCE_METRICS = ("val_loss", "task_accuracy_seen", "task_accuracy_heldout")
VERDICT_METRIC = "val_loss"
# Where each MoE's mean validation curve overtakes the dense model's (studies/crossover.py).
CROSSOVER_PAIRS = (("moe_softmax_topk", "dense"), ("moe_mpi", "dense"))
TITLE = "moealign demo: dense vs softmax top-k MoE vs MPI MoE"


def demo_config_path() -> Path:
    """``configs/demo.toml`` of the source tree (the package is installed editable)."""
    path = Path(__file__).resolve().parents[3] / "configs" / "demo.toml"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: run the demo from a source checkout installed with "
            "`bash scripts/setup.sh` (pip install -e)"
        )
    return path


def check_seeds(seeds: Sequence[int]) -> tuple[int, ...]:
    """The seeds as a tuple; at least two distinct ones (an interval needs two)."""
    seeds = tuple(seeds)
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise ConfigError("--seeds", f"got {list(seeds)}; expected at least 2 distinct integers")
    return seeds


def variant_configs(base: RunConfig) -> dict[str, RunConfig]:
    """The three models: the MoE of ``base``, its MPI twin and the dense baseline of equal
    active FFN width (``ModelConfig.dense_matched``)."""
    moe = replace(base.model, ffn="moe")
    return {
        "dense": replace(base, name="dense", model=moe.dense_matched()),
        "moe_softmax_topk": replace(
            base, name="moe_softmax_topk", model=replace(moe, router="softmax_topk")
        ),
        "moe_mpi": replace(base, name="moe_mpi", model=replace(moe, router="mpi")),
    }


def run_name(variant: str, seed: int) -> str:
    """The run directory's name, as ``moealign ablate`` names its cells."""
    return f"{variant}__seed{seed}"


def seeded(config: RunConfig, seed: int) -> RunConfig:
    return replace(config, name=run_name(config.name, seed), train=replace(config.train, seed=seed))


def train_run(config: RunConfig, run_dir: Path, progress: bool) -> bool:
    """Train one model (or reuse its finished run); False if a signal interrupted it (its
    checkpoint is saved and the next demo continues it)."""
    from moealign.io import read_json
    from moealign.training.runs import check_same_config
    from moealign.training.trainer import Trainer

    if (run_dir / "final_eval.json").is_file():  # reused only if trained with this config
        check_same_config(run_dir, read_json(run_dir / "config.json"), config.to_dict())
        return True
    resume = (run_dir / "config.json").is_file()
    trainer = Trainer(config, run_dir=run_dir, resume=resume, progress=progress)
    try:
        result = trainer.train()
    finally:
        trainer.close()
    return not result.interrupted


# ---------------------------------------------------------------------- statistics


def _by_seed(runs: Sequence[RunRecord], metric: str) -> dict[int, float]:
    from moealign.studies.results import run_results

    values = {run.seed: run_results(run).get(metric) for run in runs}
    return {seed: value for seed, value in values.items() if value is not None}


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def model_statistics(run_set: RunSet) -> dict[str, dict[str, dict[str, Any]]]:
    """Per model and metric: mean, 95% t half width (None for one seed) and n."""
    from moealign.evaluation.stats import mean_confidence_interval

    statistics = {}
    for variant in run_set.variants:
        statistics[variant] = {}
        for metric in METRICS:
            values = list(_by_seed(run_set.of_variant(variant), metric).values())
            if values:
                mean, half_width, n = mean_confidence_interval(values, CONFIDENCE)
                statistics[variant][metric] = {
                    "mean": mean,
                    "half_width": _finite_or_none(half_width),
                    "n": n,
                }
    return statistics


def paired_comparisons(
    run_set: RunSet, margins: dict[str, float] | None = None
) -> list[dict[str, Any]]:
    """Every (model, baseline) of COMPARISONS and metric of DIFFERENCE_METRICS with at least two
    seeds both finished: Δ = model − baseline, its 95% t interval, the paired t-test p-value,
    the TOST p-value against the metric's equivalence margin (``margins``, else
    :func:`moealign.evaluation.verdicts.default_margin`), both Holm-adjusted over the whole set
    of comparisons, and the outcome (lower / higher / equivalent / inconclusive)."""
    from moealign.evaluation.verdicts import default_margin, holm, paired_comparison
    from moealign.studies.report import metric_direction

    keys, tests = [], []
    for variant, baseline in COMPARISONS:
        for metric in DIFFERENCE_METRICS:
            ours = _by_seed(run_set.of_variant(variant), metric)
            theirs = _by_seed(run_set.of_variant(baseline), metric)
            seeds = sorted(ours.keys() & theirs.keys())
            if len(seeds) < 2:
                continue
            keys.append(
                {"variant": variant, "baseline": baseline, "metric": metric, "seeds": seeds}
            )
            tests.append(
                paired_comparison(
                    [ours[s] for s in seeds],
                    [theirs[s] for s in seeds],
                    default_margin(metric, margins),
                    1 - CONFIDENCE,
                )
            )
    return [
        key
        | test.to_dict()
        | {"half_width": test.high - test.delta, "text": test.text(metric_direction(key["metric"]))}
        for key, test in zip(keys, holm(tests), strict=True)
    ]


def verdict(comparison: dict[str, Any]) -> str:
    """One line: the difference, its interval, raw and Holm-adjusted p-values and the outcome
    (:class:`moealign.evaluation.verdicts.Comparison`; lower/higher say better or worse)."""
    from moealign.evaluation.verdicts import format_p
    from moealign.studies.report import metric_direction

    c = comparison
    low, high = (format_number(c[key], digits=3, signed=True) for key in ("low", "high"))
    p_text = f"{format_p(c['p_value'])}, Holm {format_p(c['p_adjusted'])}"
    margin = "no equivalence margin" if c["margin"] is None else f"margin ±{c['margin']:g}"
    head = (
        f"{c['variant']} vs {c['baseline']}: Δ {c['metric']} = "
        f"{format_number(c['delta'], digits=3, signed=True)} "
        f"(95% CI [{low}, {high}], {p_text} over {c['family']} tests, {margin}, "
        f"n = {len(c['seeds'])} seeds)"
    )
    direction = metric_direction(c["metric"])
    outcome = c["outcome"]
    if outcome == "equivalent":
        return f"{head}: equivalent within ±{c['margin']:g}"
    if outcome == "inconclusive":
        return f"{head}: inconclusive (neither a difference nor equivalence shown)"
    judged = "" if direction is None else (" (better)" if outcome == direction else " (worse)")
    return f"{head}: {c['variant']} {outcome}{judged}"


def crossovers(run_set: RunSet, configs: dict[str, RunConfig]) -> list[dict[str, Any]]:
    """For each pair of CROSSOVER_PAIRS: where the model's seed-mean validation loss falls
    below the baseline's for good (:func:`moealign.studies.crossover.curve_crossings`), as a
    step and in tokens, and each seed's own crossing."""
    from moealign.studies.crossover import curve_crossings

    rows = []
    for variant, baseline in CROSSOVER_PAIRS:
        mean, per_seed = curve_crossings(
            run_set.of_variant(variant), run_set.of_variant(baseline), VERDICT_METRIC
        )
        if mean is None:
            continue
        tokens_per_step = _tokens_per_step(configs[variant])
        rows.append(
            {
                "variant": variant,
                "baseline": baseline,
                "outcome": mean.outcome,
                "step": mean.step,
                "tokens": None if mean.step is None else mean.step * tokens_per_step,
                "text": mean.text(tokens_per_step),
                "per_seed": {
                    str(seed): None if c is None else c.text(tokens_per_step)
                    for seed, c in per_seed.items()
                },
            }
        )
    return rows


def _tokens_per_step(config: RunConfig) -> int:
    """Tokens of one optimizer step (the global batch): batch_size · seq_len."""
    return config.train.batch_size * config.train.seq_len


def budget_paragraphs(
    configs: dict[str, RunConfig],
    crossings: Sequence[dict[str, Any]],
    comparisons: Sequence[dict[str, Any]],
) -> list[str]:
    """Tokens seen per expert against the dense FFN at the last step, that the ranking of MoE
    and dense depends on the budget (with the crossings) and, when no MoE's val_loss outcome
    against dense is "lower" (Holm-adjusted, :mod:`moealign.evaluation.verdicts`), that no
    significant MoE advantage was reached."""
    from moealign.studies.crossover import format_tokens, tokens_per_expert

    moe, dense = configs["moe_softmax_topk"], configs["dense"]
    steps, tokens = moe.train.steps, moe.train.steps * _tokens_per_step(moe)
    per_expert = tokens_per_expert(tokens, moe.model.top_k, moe.model.n_experts)
    paragraphs = [
        f"Tokens seen in {steps} steps: each of the {moe.model.n_experts} experts of an MoE "
        f"layer receives on average K/E = {moe.model.top_k}/{moe.model.n_experts} of the token "
        f"slots, {format_tokens(per_expert)}, while the dense FFN (width "
        f"{dense.model.d_ff}) sees all {format_tokens(tokens)}."
    ]
    where = "; ".join(f"{c['variant']}: {c['text']}" for c in crossings) or "not evaluated"
    paragraphs.append(
        "The ranking depends on the training budget: each expert trains on only K/E of the "
        "tokens, so an MoE can trail the dense model of the same active size early and lead "
        f"it later. Where the mean validation curves cross here: {where}. A run stopped at "
        "another step can rank the models differently."
    )
    ahead = [
        c["variant"]
        for c in comparisons
        if c["baseline"] == "dense" and c["metric"] == VERDICT_METRIC and c["outcome"] == "lower"
    ]
    if not ahead:
        paragraphs.append(
            "No MoE reaches a significant advantage over dense within this budget (no MoE's "
            "val_loss verdict against dense is lower): telling needs more seeds or a longer "
            "run (`--set train.steps=N`, `--preset full`; docs/demo.md)."
        )
    return paragraphs


def _crossover_table(crossings: Sequence[dict[str, Any]], seeds: Sequence[int]) -> Table:
    rows = [
        [
            f"{c['variant']} vs {c['baseline']}",
            c["text"],
            *(c["per_seed"].get(str(seed)) or "n/a" for seed in seeds),
        ]
        for c in crossings
    ]
    return Table(["MoE vs dense", "mean curves", *(f"seed {s}" for s in seeds)], rows)


# ---------------------------------------------------------------------- summary


def _models_table(run_set: RunSet, configs: dict[str, RunConfig]) -> Table:
    rows = []
    for variant in run_set.variants:
        model = configs[variant].model
        finished = run_set.of_variant(variant)
        final = finished[0].final_eval if finished else {}
        kind = "dense SwiGLU" if model.ffn == "dense" else f"MoE, router {model.router}"
        rows.append(
            [
                variant,
                kind,
                f"{final.get('params_total', 0):,}",
                f"{final.get('params_active', 0):,}",
            ]
        )
    return Table(["model", "FFN", "params total", "params active"], rows)


def _differences_table(comparisons: Sequence[dict[str, Any]]) -> Table:
    """One row per (model, baseline) of :func:`paired_comparisons`, one column per metric of
    DIFFERENCE_METRICS: "Δ ± half width (p, Holm p, n): outcome"."""
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for c in comparisons:
        cells.setdefault((c["variant"], c["baseline"]), {})[c["metric"]] = c["text"]
    rows = [
        [variant, baseline, *(found.get(metric, "–") for metric in DIFFERENCE_METRICS)]
        for (variant, baseline), found in cells.items()
    ]
    return Table(["model", "baseline", *(f"Δ {metric}" for metric in DIFFERENCE_METRICS)], rows)


def summary_sections(
    run_set: RunSet,
    configs: dict[str, RunConfig],
    seeds: Sequence[int],
    preset: str,
    verdicts: Sequence[str],
    curves: Path | None,
    comparisons: Sequence[dict[str, Any]],
    margins: dict[str, float] | None = None,
    crossings: Sequence[dict[str, Any]] = (),
    budget: Sequence[str] = (),
) -> list[Section]:
    """The summary as document sections (Markdown for summary.md and the terminal)."""
    from moealign.evaluation.verdicts import outcome_legend
    from moealign.studies.report import ablation_table

    seed_text = ", ".join(str(s) for s in seeds)
    sections = [
        Section(
            "Models",
            [
                _models_table(run_set, configs),
                Paragraph(
                    f"Preset `{preset}`; seeds {seed_text} (`train.seed`: initialisation and "
                    "router noise; the data and its order are the same for every run). Each "
                    "run directory `<model>__seed<seed>` holds its resolved config."
                ),
            ],
        ),
        Section(
            "Results",
            [
                ablation_table(run_set, METRICS),
                Note(
                    f"mean ± 95% Student-t half width over the {len(seeds)} seeds; bold: the "
                    "best mean, clear of the runner-up's interval; italic: the best mean, but the "
                    "intervals overlap (not shown to be best)"
                ),
            ],
        ),
        Section(
            "Paired differences by seed",
            [
                _differences_table(comparisons),
                Note(
                    "Δ = model − baseline, mean ± 95% t half width; p: two-sided paired t-test, "
                    "Holm: adjusted over the table's "
                    f"{max((c['family'] for c in comparisons), default=0)} tests with a p-value "
                    "(p=n/a: every seed gave the same difference). " + outcome_legend(margins)
                ),
            ],
        ),
        Section(
            "Verdicts",
            [Paragraph("\n".join(f"- {line}" for line in verdicts) or "no comparison")],
        ),
        Section(
            "Crossover and budget",
            [
                _crossover_table(crossings, seeds),
                Note(
                    "where the MoE's validation loss falls below the dense model's for good, "
                    "interpolated between evaluations (tokens = step · batch_size · seq_len)"
                ),
                *(Paragraph(text) for text in budget),
            ],
        ),
    ]
    if curves is not None:
        caption = "loss curves: mean over seeds, band from the lowest to the highest seed"
        sections.append(Section("Loss curves", [Image(curves, caption)]))
    return sections


def plot_loss_curves(run_set: RunSet, path: Path) -> Path | None:
    from moealign.studies.plots import plot_curves

    variants = {variant: run_set.of_variant(variant) for variant in run_set.variants}
    panels = [("lm_loss", "train"), ("val_loss", "val")]
    return plot_curves(variants, panels, path, TITLE)


def run_demo(
    out: Path,
    preset: str = "quick",
    overrides: Sequence[str] = (),
    progress: bool = True,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    margins: dict[str, float] | None = None,
) -> dict[str, Any] | None:
    """Train every model with every seed, evaluate and compare them (``margins``: equivalence
    margins by metric, over the defaults); write the summary files and return what
    summary.json holds (None if interrupted)."""
    from moealign.studies.results import RunSet, load_run

    seeds = check_seeds(seeds)
    base = load_config(demo_config_path(), [*PRESETS[preset], *overrides])
    configs = variant_configs(base)
    runs = [(seed, name, config) for seed in seeds for name, config in configs.items()]
    for number, (seed, name, config) in enumerate(runs, 1):
        write_progress(
            f"demo: run {number}/{len(runs)}: {name} seed {seed} ({config.model.ffn} FFN, "
            f"router {config.model.router})"
        )
        if not train_run(seeded(config, seed), out / run_name(name, seed), progress):
            return None
    run_set = RunSet(
        [load_run(out / run_name(v, s), variant=v, seed=s) for v in configs for s in seeds]
    )
    comparisons = paired_comparisons(run_set, margins)
    verdicts = [verdict(c) for c in comparisons if c["metric"] == VERDICT_METRIC]
    crossings = crossovers(run_set, configs)
    budget = budget_paragraphs(configs, crossings, comparisons)
    curves = plot_loss_curves(run_set, out / "loss_curves.png")
    sections = summary_sections(
        run_set, configs, seeds, preset, verdicts, curves, comparisons, margins, crossings, budget
    )
    summary = {
        "preset": preset,
        "seeds": list(seeds),
        "confidence": CONFIDENCE,
        "margins": margins or {},
        "runs": [
            {
                "variant": run.variant,
                "seed": run.seed,
                "run_dir": str(run.path),
                **_run_metrics(run),
            }
            for run in run_set.runs
        ],
        "models": model_statistics(run_set),
        "comparisons": comparisons,
        "verdicts": verdicts,
        "crossovers": crossings,
        "budget": budget,
    }
    atomic_write_json(out / "summary.json", summary, sort_keys=False)
    atomic_write_text(out / "summary.md", to_markdown(TITLE, sections, out))
    print()
    print(terminal_text(sections))
    return summary


def terminal_text(sections: Sequence[Section]) -> str:
    """The summary for the terminal: section titles, tables (moealign.tables.to_text), notes
    and paragraphs; images are left out."""
    parts = []
    for section in sections:
        blocks = [block for block in section.blocks if not isinstance(block, Image)]
        if blocks:
            parts.append(f"{section.title}\n{'=' * len(section.title)}")
        parts += [to_text(block) if isinstance(block, Table) else block.text for block in blocks]
    return "\n\n".join(parts)


def _run_metrics(run: RunRecord) -> dict[str, float]:
    from moealign.studies.results import run_results

    results = run_results(run)
    keys = ("params_total", "params_active", *METRICS)
    return {key: results[key] for key in keys if key in results}


def run(args: argparse.Namespace) -> int:
    from moealign.training.preflight import check_writable_folder

    out = Path(args.out)
    check_writable_folder(out, "--out")
    summary = run_demo(
        out,
        args.preset,
        args.overrides,
        progress=not args.no_progress,
        seeds=args.seeds,
        margins=dict(args.margins or []),
    )
    if summary is None:
        print("interrupted: run the same command again to continue", file=sys.stderr)
        return 130
    print(f"summary: {out / 'summary.md'}   plots: {out / 'loss_curves.png'}")
    return 0
