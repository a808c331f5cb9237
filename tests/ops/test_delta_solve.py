"""The in-kernel unit lower-triangular inverse of the gated delta rule (Triton interpreter, fp32)
against an fp64 triangular solve, on well and badly conditioned WY matrices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]

_SCRIPT = textwrap.dedent(
    """
    import json
    import torch
    import torch.nn.functional as F
    import triton
    import triton.language as tl
    from models.ops.triton_ops.delta_wy_kernels import unit_lower_inv

    @triton.jit
    def inv_kernel(l_ptr, a_ptr, C: tl.constexpr):
        r = tl.arange(0, C)
        off = tl.program_id(0) * C * C + r[:, None] * C + r[None, :]
        tl.store(a_ptr + off, unit_lower_inv(tl.load(l_ptr + off), C, "ieee"))

    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, spread in (("random", 1.0), ("correlated", 0.05)):
        base = torch.randn(8, 1, 64, generator=gen, dtype=torch.float64)
        noise = torch.randn(8, 64, 64, generator=gen, dtype=torch.float64)
        k = F.normalize(base + spread * noise, dim=-1)
        beta = torch.rand(8, 64, 1, generator=gen, dtype=torch.float64) * 0.5 + 0.5
        lmat = (beta * (k @ k.transpose(-1, -2))).tril(-1)
        eye = torch.eye(64, dtype=torch.float64).expand(8, 64, 64)
        want = torch.linalg.solve_triangular(eye + lmat, eye, upper=False, unitriangular=True)
        got = torch.empty(8, 64, 64)
        inv_kernel[(8,)](lmat.float().contiguous(), got, C=64)
        err = ((got.double() - want).norm() / want.norm()).item()
        resid = ((got.double() @ (eye + lmat) - eye).norm() / eye.norm()).item()
        out[name] = (err, resid, torch.linalg.cond(eye + lmat).max().item())
    print("RESULT " + json.dumps(out))
    """
)


@pytest.mark.timeout(120)
def test_unit_lower_inverse_matches_fp64():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=110, env=env
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert lines, f"worker failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    res = json.loads(lines[0][len("RESULT ") :])
    for name, (err, resid, cond) in res.items():
        # fp32 rounding times the conditioning of I + L
        assert err < 1e-6 * max(1.0, cond), (name, err, cond)
        assert resid < 1e-5, (name, resid, cond)
