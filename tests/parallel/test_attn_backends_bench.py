"""The attention-backend benchmark's merge check on CPU (aten's CPU flash kernel and the math
path): LASP-2H's LSE-merged blocks and their backward from the merged output, against fp32."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.timeout(120)
def test_attn_backends_cpu_smoke():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "attn_backends.py"), "--cpu"],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    errs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(errs) == {"flash", "math"}
    for backend, e in errs.items():
        assert set(e) == {"o", "dq", "dk", "dv"}
        assert all(0 <= x < 1e-2 for x in e.values()), (backend, e)
