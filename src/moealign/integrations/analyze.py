"""``moealign analyze``: routing diagnostics of a Hugging Face MoE model on a text or JSONL file.

The model is read with ``AutoModelForCausalLM.from_pretrained`` (a local directory, or a hub
name where the hub is reachable), its tokenizer with ``AutoTokenizer.from_pretrained``. The
documents are cut into windows of ``seq_len`` tokens; routing is captured with
:func:`moealign.integrations.hf.capture_routing` and summarised per MoE layer (expert
utilisation, dead experts, usage and per-token entropy, global MaxVio, balance and z-loss,
projection alignment; the names of :mod:`moealign.evaluation.routing_stats`, DESIGN.md §3–4).
Written to the output directory: ``routing.json``, ``routing.md``, ``utilisation.png`` (layer ×
expert heatmap) and ``entropy_maxvio.png`` (per-layer bars).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from moealign.data.loaders import load_jsonl, load_text_files
from moealign.io import naming_file
from moealign.progress import phase, track
from moealign.tables import Table, to_markdown


def load_texts(path: str | Path, text_field: str = "text") -> list[str]:
    """The documents of a ``.jsonl`` file (``text_field`` of each line) or of one text file."""
    path = Path(path)
    if path.suffix == ".jsonl":
        documents = load_jsonl(path, text_field=text_field)
    else:
        documents = load_text_files([path])
    return [document.text for document in documents]


def token_batches(
    token_ids: Sequence[Sequence[int]], seq_len: int, batch_size: int, max_tokens: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded batches of windows of at most ``seq_len`` tokens of each document, up to
    ``max_tokens`` real tokens in all; padding has attention_mask 0."""
    for name, value in (
        ("seq_len", seq_len),
        ("batch_size", batch_size),
        ("max_tokens", max_tokens),
    ):
        if value < 1:
            raise ValueError(f"{name}={value} is not accepted; expected an integer >= 1")
    windows, budget = [], max_tokens
    for ids in token_ids:
        for start in range(0, len(ids), seq_len):
            window = list(ids[start : start + seq_len])[:budget]
            if window:
                windows.append(window)
                budget -= len(window)
    if not windows:
        raise ValueError("the data holds no tokens after tokenisation")
    for first in range(0, len(windows), batch_size):
        group = windows[first : first + batch_size]
        width = max(len(window) for window in group)
        input_ids = torch.zeros(len(group), width, dtype=torch.long)
        attention_mask = torch.zeros(len(group), width, dtype=torch.long)
        for row, window in enumerate(group):
            input_ids[row, : len(window)] = torch.tensor(window)
            attention_mask[row, : len(window)] = 1
        yield {"input_ids": input_ids, "attention_mask": attention_mask}


def analyze_model(model: torch.nn.Module, batches: Iterator[dict[str, torch.Tensor]]) -> list[dict]:
    """Per-layer routing statistics of ``model`` over all ``batches`` (one
    :class:`~moealign.evaluation.routing_stats.RoutingStats`; :func:`hf.routing_rows`)."""
    from moealign.evaluation.routing_stats import RoutingStats
    from moealign.integrations.hf import capture_routing, routing_rows

    device = next(model.parameters()).device
    statistics = None
    model.eval()
    with torch.no_grad():
        for inputs in batches:
            capture = capture_routing(model, {k: v.to(device) for k, v in inputs.items()})
            if statistics is None:
                statistics = RoutingStats(len(capture.layers), capture.layers[0].probs.shape[-1])
            statistics.add(capture.routing())
    if statistics is None:
        raise ValueError("batches is empty; give at least one batch of tokens")
    return routing_rows(model, statistics)


def _markdown(rows: list[dict], title: str) -> str:
    lines = [
        f"# Routing diagnostics: {title}",
        "",
        f"{rows[0]['tokens']:,} tokens. Entropies are normalised by log E; utilisation is an "
        "expert's load over the mean load; MaxVio = (max load − mean load) / mean load; λ is the "
        "mean projection alignment (MPI paper Eq. 11).",
        "",
        to_markdown(
            Table(
                ["layer", "experts", "dead", "usage entropy", "token entropy", "MaxVio", "λ"],
                [
                    [
                        str(row["layer"]),
                        str(len(row["expert_counts"])),
                        str(row["dead_experts"]),
                        f"{row['usage_entropy']:.3f}",
                        f"{row['token_entropy']:.3f}",
                        f"{row['max_vio']:.3f}",
                        f"{row['projection_alignment']:.3f}",
                    ]
                    for row in rows
                ],
            )
        ),
    ]
    lines += [
        "",
        "![utilisation](utilisation.png)",
        "",
        "![entropy and MaxVio](entropy_maxvio.png)",
    ]
    return "\n".join(lines) + "\n"


def write_report(rows: list[dict], out_dir: str | Path, title: str) -> dict[str, Path]:
    """Write routing.json, routing.md, utilisation.png and entropy_maxvio.png to ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("routing.json", "routing.md")}
    paths["routing.json"].write_text(json.dumps({"model": title, "layers": rows}, indent=2))
    paths["routing.md"].write_text(_markdown(rows, title))

    layer_labels = [str(row["layer"]) for row in rows]
    figure, axis = plt.subplots(figsize=(8, 1 + 0.4 * len(rows)))
    image = axis.imshow([row["expert_utilisation"] for row in rows], aspect="auto", cmap="viridis")
    axis.set(xlabel="expert", ylabel="layer", title="expert utilisation (load / mean load)")
    axis.set_yticks(range(len(rows)), layer_labels)
    figure.colorbar(image, ax=axis)
    paths["utilisation.png"] = out / "utilisation.png"
    figure.savefig(paths["utilisation.png"], dpi=120, bbox_inches="tight")
    plt.close(figure)

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    left.bar(layer_labels, [row["token_entropy"] for row in rows], label="per token")
    left.plot(layer_labels, [row["usage_entropy"] for row in rows], "o-", color="C1", label="usage")
    left.set(xlabel="layer", ylabel="entropy / log E", title="routing entropy", ylim=(0, 1.05))
    left.legend()
    right.bar(layer_labels, [row["max_vio"] for row in rows], color="C3")
    right.set(xlabel="layer", ylabel="MaxVio", title="load imbalance (global MaxVio)")
    paths["entropy_maxvio.png"] = out / "entropy_maxvio.png"
    figure.savefig(paths["entropy_maxvio.png"], dpi=120, bbox_inches="tight")
    plt.close(figure)
    return paths


def run_analyze(args: argparse.Namespace) -> int:
    """Load the model and tokenizer, analyse the data, write the report; print where."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moealign.integrations.hf import detect_family
    from moealign.integrations.locations import pretrained_location

    texts = load_texts(args.data, args.text_field)
    model_path = pretrained_location(args.model, "model")
    tokenizer_path = pretrained_location(args.tokenizer or args.model, "--tokenizer")
    with phase("analyze: load the model"):
        with naming_file("tokenizer", tokenizer_path):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        with naming_file("model", model_path):
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto")
    detect_family(model)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    # Whole documents are tokenised, then cut into windows: no warning about their length.
    token_ids = [
        tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] for text in texts
    ]
    batches = token_batches(token_ids, args.seq_len, args.batch_size, args.max_tokens)
    rows = analyze_model(model, track(batches, "analyze: batches"))
    with phase("analyze: write the report"):
        paths = write_report(rows, args.out, str(args.model))
    print(f"{rows[0]['tokens']:,} tokens, {len(rows)} MoE layers; report: {paths['routing.md']}")
    return 0
