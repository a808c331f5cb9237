"""Launches :mod:`_triton_worker` in a subprocess (Triton interpreter) and parses its result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).resolve().parent / "_triton_worker.py"


def run_worker(family: str, timeout: float) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(WORKER), family],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"worker failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
