"""The main job, ``moealign demo``: dense vs softmax top-k MoE vs MPI MoE on the built-in data.

Trains three models of matched *active* size from ``configs/demo.toml`` (a dense SwiGLU
baseline with FFN width K·F, a softmax top-k MoE and the same MoE with the MPI router, DESIGN.md
§3) on a mix of the Python standard library's sources and the synthetic task suite, evaluates
them, prints a comparison table (validation loss and perplexity, task accuracy on seen and
held-out tasks, MaxVio, tokens/s) and writes it with loss-curve plots into the output directory.
A model whose run already finished there is reused, so an interrupted demo continues.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from moealign.config import RunConfig, load_config
from moealign.tables import Table, to_markdown, to_text

PRESETS = {
    # about seven minutes on two CPU cores
    "quick": [],
    # a longer, wider run for a GPU or a patient CPU
    "full": [
        "model.d_model=256",
        "model.n_layers=6",
        "model.expert_d_ff=256",
        "model.n_experts=16",
        "train.steps=3000",
        "train.batch_size=32",
        "train.eval_every=500",
        "train.checkpoint_every=500",
        "train.task_eval_examples=50",
    ],
}
VARIANTS = ("dense", "moe_softmax_topk", "moe_mpi")


def demo_config_path() -> Path:
    """``configs/demo.toml`` of the source tree (the package is installed editable)."""
    path = Path(__file__).resolve().parents[3] / "configs" / "demo.toml"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: run the demo from a source checkout installed with "
            "`bash scripts/setup.sh` (pip install -e)"
        )
    return path


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


def train_variant(config: RunConfig, run_dir: Path, progress: bool) -> dict[str, Any] | None:
    """Train one model (or reuse its finished run) and return its summary row; None if a
    signal interrupted it (its checkpoint is saved and the next demo continues it)."""
    from moealign.training.trainer import Trainer

    final_path = run_dir / "final_eval.json"
    if not final_path.is_file():
        resume = (run_dir / "config.json").is_file()
        trainer = Trainer(config, run_dir=run_dir, resume=resume, progress=progress)
        try:
            result = trainer.train()
        finally:
            trainer.close()
        if result.interrupted:
            return None
    return summarise_run(run_dir)


def summarise_run(run_dir: Path) -> dict[str, Any]:
    final = json.loads((run_dir / "final_eval.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("split") == "train" and "tokens_per_s" in r]
    speeds = sorted(r["tokens_per_s"] for r in train)
    return {
        "run_dir": str(run_dir),
        "params_total": final["params_total"],
        "params_active": final["params_active"],
        "val_loss": final["val_loss"],
        "val_ppl": final["val_ppl"],
        "task_accuracy_seen": final.get("task_accuracy_seen"),
        "task_accuracy_heldout": final.get("task_accuracy_heldout"),
        "max_vio": final.get("val_routing/max_vio"),
        "tokens_per_s": speeds[len(speeds) // 2] if speeds else None,
    }


COLUMNS = (
    ("model", "{}"),
    ("params total/active", "{}"),
    ("val loss", "{:.4f}"),
    ("val ppl", "{:.2f}"),
    ("task acc seen", "{:.3f}"),
    ("task acc held-out", "{:.3f}"),
    ("MaxVio global", "{:.3f}"),
    ("tokens/s", "{:,.0f}"),
)


def table_rows(summaries: dict[str, dict[str, Any]]) -> list[list[str]]:
    rows = []
    for name, s in summaries.items():
        values = [
            name,
            f"{s['params_total']:,}/{s['params_active']:,}",
            s["val_loss"],
            s["val_ppl"],
            s["task_accuracy_seen"],
            s["task_accuracy_heldout"],
            s["max_vio"],
            s["tokens_per_s"],
        ]
        rows.append(
            [
                fmt.format(v) if v is not None else "—"
                for (_, fmt), v in zip(COLUMNS, values, strict=True)
            ]
        )
    return rows


def summary_table(summaries: dict[str, dict[str, Any]]) -> Table:
    """The comparison table (rendered to Markdown and to the terminal by moealign.tables)."""
    return Table(
        [name for name, _ in COLUMNS], table_rows(summaries), align="l" + "r" * (len(COLUMNS) - 1)
    )


def plot_loss_curves(summaries: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for name, summary in summaries.items():
        lines = (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        train = [(r["step"], r["lm_loss"]) for r in records if r.get("split") == "train"]
        val = [(r["step"], r["val_loss"]) for r in records if r.get("split") == "val"]
        ax_train.plot(*zip(*train, strict=True), label=name)
        ax_val.plot(*zip(*val, strict=True), marker="o", label=name)
    for axis, title in ((ax_train, "training LM loss"), (ax_val, "validation loss")):
        axis.set_title(title)
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("cross-entropy (nats/token)")
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(
    out: Path, preset: str = "quick", overrides: list[str] = (), progress: bool = True
) -> dict[str, dict[str, Any]] | None:
    """Train, evaluate and compare the three models; returns their summaries (None if
    interrupted)."""
    base = load_config(demo_config_path(), [*PRESETS[preset], *overrides])
    summaries = {}
    for name, config in variant_configs(base).items():
        print(f"== {name}: {config.model.ffn} FFN, router {config.model.router}", flush=True)
        summary = train_variant(config, out / name, progress)
        if summary is None:
            return None
        summaries[name] = summary
    out.mkdir(parents=True, exist_ok=True)
    plot_loss_curves(summaries, out / "loss_curves.png")
    _write_atomic(out / "summary.json", json.dumps(summaries, indent=2) + "\n")
    _write_atomic(
        out / "summary.md",
        "# moealign demo: dense vs softmax top-k MoE vs MPI MoE\n\n"
        f"Preset `{preset}`; configs in each run directory's `config.json`.\n\n"
        + to_markdown(summary_table(summaries))
        + "\n\n![loss curves](loss_curves.png)\n",
    )
    return summaries


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    summaries = run_demo(out, args.preset, args.overrides, progress=not args.no_progress)
    if summaries is None:
        print("interrupted: run the same command again to continue", file=sys.stderr)
        return 130
    print()
    print(to_text(summary_table(summaries)))
    print(f"\ntable: {out / 'summary.md'}   plots: {out / 'loss_curves.png'}")
    return 0
