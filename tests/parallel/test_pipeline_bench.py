"""The pipeline benchmark's plumbing on CPU: 2 gloo ranks, tiny model, one schedule of each
kind, a JSON with the fields the README table reads (timings on CPU mean nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.dist_harness import torchrun_cmd


@pytest.mark.timeout(150)
def test_pipeline_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "pipeline.json"
    cmd = [
        *torchrun_cmd(2),
        str(ROOT / "benchmarks" / "pipeline.py"),
        "--cpu",
        "--preset",
        "tiny",
        "--seq-len",
        "32",
        "--microbatches",
        "2",
        "--pp",
        "2",
        "--schedules",
        "1F1B,ZBVZeroBubble",
        "--warmup",
        "1",
        "--steps",
        "1",
        "--set",
        "model.dim=64",
        "--set",
        "model.ffn_dim=128",
        "--set",
        "model.n_heads=2",
        "--set",
        "data.max_files=4",
        "--out",
        str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=140)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert [row["name"] for row in data["rows"]] == ["pp2-1F1B", "pp2-ZBVZeroBubble"]
    row = data["rows"][0]
    assert row["split"] == [2, 2] and 0 <= row["bubble_measured"] < 1
    assert row["bubble_theory"] == pytest.approx(1 / 3)
    assert len(row["busy_per_rank_s"]) == 2 and max(row["busy_per_rank_s"]) == row["busy_s"]
    # Step 1 from the same init: the schedules agree (fp32 on CPU: to rounding).
    zbv = data["rows"][1]
    assert zbv["first_loss"] == pytest.approx(row["first_loss"], rel=1e-5)
    assert zbv["first_grad_norm"] == pytest.approx(row["first_grad_norm"], rel=1e-4)
    assert set(data["meta"]) >= {"card", "torch", "command", "date"}
    assert "pp2" in data["headline"]
    assert data["headline"]["pp2"]["first_grad_norm_rel_spread"] < 1e-4
    table = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "pipeline.py"), "--table", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert "| pp2-1F1B |" in table.stdout
