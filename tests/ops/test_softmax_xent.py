"""The fused cross-entropy kernel (Triton interpreter, fp32) against torch's cross-entropy in
fp64: loss, hidden and weight gradients, with ignored rows, a ragged last chunk and a
vocabulary that spans several kernel blocks and is not a multiple of one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.loss import chunked_cross_entropy

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]

_WORKER = r"""
import json, torch
import torch.nn.functional as F
from models.loss import chunked_cross_entropy
torch.manual_seed(0)
out = {}
for name, N, D, V, chunk in (("multi_block", 13, 16, 9000, 5), ("one_block", 7, 8, 300, 64)):
    h = torch.randn(N, D, dtype=torch.float64) * 2
    w = torch.randn(V, D, dtype=torch.float64)
    y = torch.randint(0, V, (N,))
    y[1] = -100
    y[N - 1] = V - 1
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = F.cross_entropy(hr @ wr.t(), y, ignore_index=-100, reduction="sum")
    ref.backward()
    hf, wf = h.float().requires_grad_(), w.float().requires_grad_()
    got = chunked_cross_entropy(hf, wf, y, chunk_tokens=chunk)
    got.backward()
    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()
    out[name] = {"loss": rel(got.detach(), ref.detach()), "dh": rel(hf.grad, hr.grad),
                 "dw": rel(wf.grad, wr.grad)}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.timeout(300)
def test_fused_xent_matches_torch_in_the_interpreter():
    env = dict(
        os.environ,
        TRITON_INTERPRET="1",
        LINSCALE_CE_BACKEND="triton",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT),
    )
    proc = subprocess.run(
        [sys.executable, "-c", _WORKER], capture_output=True, text=True, env=env, timeout=280
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"worker failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    for case, errs in json.loads(lines[0][len("RESULT ") :]).items():
        bad = {k: e for k, e in errs.items() if not e < 1e-5}
        assert not bad, f"{case}: relative errors over 1e-5: {bad}"


def test_labels_outside_the_vocabulary_are_named():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        chunked_cross_entropy(h, w, torch.tensor([1, 2, 10, -100]))


def test_unknown_ce_backend_is_named(monkeypatch):
    monkeypatch.setenv("LINSCALE_CE_BACKEND", "cuda")
    with pytest.raises(ValueError, match="LINSCALE_CE_BACKEND"):
        chunked_cross_entropy(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([0, 1]))
