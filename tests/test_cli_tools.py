"""`linscale report` and `linscale slurm`: outputs and user errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from launch.config import ConfigError
from launch.report import scaling_rows, write_scaling_report
from launch.slurm import render_sbatch
from tests.conftest import ROOT


def results_file(tmp_path):
    rows = [
        {"name": "linear", "sp": 1, "tokens_per_s": 1000.0, "mfu": 0.40},
        {"name": "linear", "sp": 2, "tokens_per_s": 1900.0, "mfu": 0.38},
        {"name": "linear", "sp": 4, "tokens_per_s": 3600.0, "mfu": 0.36},
    ]
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"card": "test", "rows": rows}))
    return p


def test_scaling_efficiency(tmp_path):
    rows = {r["gpus"]: r for r in scaling_rows([str(results_file(tmp_path))])}
    assert rows[1]["efficiency"] == pytest.approx(1.0)
    assert rows[4]["efficiency"] == pytest.approx(0.9)


def test_report_writes_table_and_plot(tmp_path):
    md = write_scaling_report([str(results_file(tmp_path))], str(tmp_path / "rep"))
    text = md.read_text()
    assert "| linear | 4 | 3,600 | 900 | 0.360 | 0.900 |" in text
    png = tmp_path / "rep.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_bad_input(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        scaling_rows([str(tmp_path / "nope.json")])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": [{"sp": 2}]}))
    with pytest.raises(ConfigError, match="tokens_per_s"):
        scaling_rows([str(bad)])


def test_sbatch_rendering(tmp_path):
    cfg = ROOT / "configs" / "linear_llama3_1b_sp.yaml"
    text = render_sbatch(
        nodes=4, gpus_per_node=8, config=str(cfg), overrides=["parallel.sp=32"], partition="gpu"
    )
    assert "#SBATCH --nodes=4" in text and "--nproc-per-node=8" in text
    assert "#SBATCH --partition=gpu" in text and "--set parallel.sp=32" in text
    assert "NCCL_NVLS_ENABLE=0" in text
    assert "{" not in text.replace("${", "").replace("$((", "")  # every placeholder filled
    with pytest.raises(ConfigError, match="--nodes"):
        render_sbatch(nodes=0, gpus_per_node=8, config=str(cfg), overrides=[])
    with pytest.raises(ConfigError, match="--config"):
        render_sbatch(nodes=1, gpus_per_node=8, config=str(tmp_path / "x.yaml"), overrides=[])


def test_cli_report_and_bench_errors(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.cli",
            "report",
            str(results_file(tmp_path)),
            "--out",
            str(tmp_path / "x"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and (tmp_path / "x.png").is_file()
    r = subprocess.run(
        [sys.executable, "-m", "launch.cli", "bench", "nope"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "kernels" in r.stderr and "Traceback" not in r.stderr
