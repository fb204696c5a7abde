"""One RoMA summary from studies run a seed at a time.

``moealign roma --set 'seeds=[s]'`` writes one ``results.json`` per seed. This merges their
per-seed, per-question results (``methods[method][seed][set]``) and summarises them as one
study with :func:`moealign.roma.study.summarise`: accuracy with its hierarchical bootstrap
interval (seeds, then the shared questions), the held-out gain and CTGI over all seeds with
their outcomes (Holm over the methods), RoMA − router tuning with its outcome; the tables of
:func:`moealign.roma.study.markdown_tables` go to stdout (and to ``--out``). The inference cost
shown is the first study's.

    PYTHONPATH=src python3 scripts/roma_summary.py runs/roma/seed0 runs/roma/seed1 \
        runs/roma/seed2 --out runs/roma/summary.md
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from moealign.evaluation.tasks import TaskEvaluation, TaskResult
from moealign.io import atomic_write_text, read_json
from moealign.roma.study import RESULTS_FILE, markdown_tables, summarise


def task_evaluation(record: dict[str, Any]) -> TaskEvaluation:
    """A :class:`TaskEvaluation` back from its ``to_dict`` form. The prediction and reference
    texts may be left out (``docs/results/roma_study_issue24.json`` keeps only the scores): the
    summary uses the per-example correctness, so they come back empty."""
    fields = ("kind", "accuracy", "correct", "bleu", "rouge_l")
    return TaskEvaluation(
        {
            task: TaskResult(
                task,
                **{k: result[k] for k in fields if k in result},
                predictions=result.get("predictions", []),
                references=result.get("references", []),
            )
            for task, result in record["tasks"].items()
        }
    )


def merged_results(directories: list[Path]) -> dict[str, Any]:
    """The studies' per-seed results as one ``results.json``-like dict with a fresh summary.
    A seed found in two studies is an error (the same training draw counted twice)."""
    studies = [read_json(directory / RESULTS_FILE) for directory in directories]
    per_seed: dict[str, dict[str, dict[str, TaskEvaluation]]] = {}
    seeds: list[int] = []
    for directory, study in zip(directories, studies, strict=True):
        for seed in study["config"]["seeds"]:
            if seed in seeds:
                raise ValueError(f"{directory}: seed {seed} is already in an earlier study")
            seeds.append(seed)
        for method, by_seed in study["methods"].items():
            for seed, sets in by_seed.items():
                evaluations = {name: task_evaluation(record) for name, record in sets.items()}
                per_seed.setdefault(method, {})[seed] = evaluations
    methods = [m for m in per_seed if all(str(s) in per_seed[m] for s in seeds)]
    first = studies[0]
    return {
        "base_run": first["base_run"],
        "config": first["config"] | {"seeds": seeds},
        "summary": summarise({m: per_seed[m] for m in methods}, seeds),
        "inference_cost": first["inference_cost"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("studies", type=Path, nargs="+", help="moealign roma --out directories")
    parser.add_argument("--out", type=Path, help="also write the tables to this file")
    args = parser.parse_args()
    text = markdown_tables(merged_results(args.studies))
    if args.out:
        atomic_write_text(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
