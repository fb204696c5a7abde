"""Paired side study of the compression study (docs/compression_study.md, issue 24): on the
same base runs and calibration tokens, the validation loss retention of

* M-SMoE and Sub-MoE merged with router mapping R2 (all E router rows kept, each group's rows
  sharing its merged expert; the library's default for moealign models) against R3 (one
  collapsed row per group, the frequency-weighted mean of the members' rows);
* Sub-MoE with its default truncated joint SVD against full rank (the frequency-weighted
  average of each cluster).

Writes ``<study>/router_mapping.json`` (per base, method, E′ and variant: the validation loss
retention compressed / original) and prints one line per compression. Only the validation
loss is measured (no task accuracy), so this takes seconds per compression.

    PYTHONPATH=src python3 scripts/compression_router_mapping.py runs/compression_study
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moealign.compression import compress_model
from moealign.compression.runs import RunSource
from moealign.evaluation.lm import evaluate_lm

VARIANTS = {  # name: (method, compress_model options)
    "msmoe R2": ("msmoe", {}),
    "msmoe R3": ("msmoe", {"collapse": True}),
    "submoe R2": ("submoe", {}),
    "submoe R3": ("submoe", {"collapse": True}),
    "submoe R2 full rank": ("submoe", {"rank": 10**6}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path, help="the study's out_dir (runs/compression_study)")
    parser.add_argument("--keep", type=int, nargs="+", default=[6, 4], help="E' values")
    parser.add_argument("--calib-tokens", type=int, default=8192)
    args = parser.parse_args()
    rows = []
    for cell in sorted(p for p in args.study.glob("*__seed*") if p.is_dir()):
        source = RunSource.open(cell)
        original = evaluate_lm(source.model, source.data.validation).loss
        for keep in args.keep:
            for name, (method, options) in VARIANTS.items():
                batches = source.calibration_batches(None, args.calib_tokens)
                result = compress_model(source.model, method, keep, batches, **options)
                loss = evaluate_lm(result.model, source.data.validation).loss
                rows.append(
                    {
                        "base": cell.name,
                        "keep": keep,
                        "variant": name,
                        "router_update": result.router_update,
                        "val_loss_retention": loss / original,
                    }
                )
                print(f"{cell.name} E'={keep} {name}: val loss × {loss / original:.3f}")
    (args.study / "router_mapping.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
