"""A short training of a Megatron-Core ``GPTModel`` with the MPI router and the routing
alignment term (issue 22), run through ``examples/megatron_mpi.py`` (the documented recipe):
the loss falls, λ′ rises from step 0, moealign's statistics appear in Megatron's MoE metrics
tracker, and a resume from Megatron's checkpoint continues bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

ROOT = Path(__file__).resolve().parents[2]
STATISTICS = (
    "max_vio",
    "max_vio_batch",
    "dead_experts",
    "usage_entropy",
    "token_entropy",
    "task_entropy",
    "projection_alignment",
    "projection_alignment_raw",
    "align_kl",
    "load_balancing_loss",  # Megatron's own, beside moealign's
    "z_loss",
)


def _example(out: Path, *args: str) -> list[dict]:
    env = os.environ | {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "examples/megatron_mpi.py"), "--out", str(out), *args]
    subprocess.run(command, check=True, env=env, capture_output=True, timeout=600)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_gpt_model_trains_with_mpi_and_alignment_and_resumes(tmp_path):
    records = _example(tmp_path, "--steps", "60", "--save-at", "30")
    assert [r["step"] for r in records] == list(range(60))
    losses = [r["loss"] for r in records]
    assert sum(losses[-10:]) / 10 < 0.85 * sum(losses[:10]) / 10
    alignment = [r["projection_alignment"] for r in records]
    assert alignment[-1] > alignment[0]
    assert [r["lambda"] for r in records[:12]] == [0.1 * min(1.0, t / 10) for t in range(12)]
    for record in records:
        assert set(STATISTICS) <= set(record), sorted(set(STATISTICS) - set(record))
        assert 0.0 <= record["projection_alignment_raw"] <= 1.0
        assert 0.0 <= record["usage_entropy"] <= 1.0
    resumed = _example(tmp_path, "--steps", "60", "--resume")[60:]
    assert [r["step"] for r in resumed] == list(range(30, 60))
    assert resumed == records[30:]  # every loss and statistic, bit for bit
