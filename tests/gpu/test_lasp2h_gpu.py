"""LASP-2H's attention blocks on a CUDA GPU, per backend (cuDNN, aten flash).

A rank's query slice attends to its own keys (causal diagonal block) and to all earlier keys
(the past block); the two partial results are merged by their LSE and each block's backward
runs from the MERGED output and LSE. Forward and every gradient must match fp32 attention over
the whole key range (bf16 inputs: relative error under 1e-2), also with GQA, a head dim of 64
and slice lengths that are no multiple of any tile. Run on the device machine:
``PYTHONPATH=. python -m pytest -m gpu tests/gpu/test_lasp2h_gpu.py -q``.
"""

from __future__ import annotations

import pytest
import torch

from parallel import lasp2h

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.timeout(600),
]


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _reference(q, k, v, do, past: int):
    """fp32 causal attention of queries at positions past.. over keys 0..; q [B, Tq, Hq, D]."""
    rep = q.shape[2] // k.shape[2]
    qr, kr, vr = (t.float().requires_grad_() for t in (q, k, v))
    kh, vh = (t.repeat_interleave(rep, dim=2).transpose(1, 2) for t in (kr, vr))
    s = (qr.transpose(1, 2) @ kh.transpose(-1, -2)) * q.shape[-1] ** -0.5
    tq, tk = q.shape[1], k.shape[1]
    allowed = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(past)
    o = (torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ vh).transpose(1, 2)
    return (o, *torch.autograd.grad(o, (qr, kr, vr), do.float()))


@pytest.mark.parametrize("backend", ["cudnn", "flash"])
@pytest.mark.parametrize(
    "B,Tq,Hq,Hkv,D", [(1, 1000, 8, 2, 128), (2, 2048, 16, 16, 128), (1, 777, 4, 4, 64)]
)
def test_merged_blocks_match_fp32(backend, B, Tq, Hq, Hkv, D, monkeypatch):
    if backend == "cudnn" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the cuDNN backend is used (and checked) on sm_90 and newer")
    monkeypatch.setenv("LINSCALE_LASP2H_BACKEND", backend)
    gen = torch.Generator(device="cuda").manual_seed(Tq)

    def rn(*s):
        return torch.randn(*s, device="cuda", generator=gen).bfloat16()

    past = 2 * Tq
    q, do = rn(B, Tq, Hq, D), rn(B, Tq, Hq, D)
    k, v = rn(B, past + Tq, Hkv, D), rn(B, past + Tq, Hkv, D)
    scale = D**-0.5
    o_d, l_d, aux_d = lasp2h.attention_block_forward(
        q, k[:, past:], v[:, past:], causal=True, scale=scale
    )
    o_p, l_p, aux_p = lasp2h.attention_block_forward(
        q, k[:, :past], v[:, :past], causal=False, scale=scale
    )
    o, lse = lasp2h._merge(o_d, l_d, o_p, l_p)
    assert o.dtype == q.dtype and lse.shape == (B, Hq, Tq) and lse.dtype == torch.float32
    dq_d, dk_d, dv_d = lasp2h.attention_block_backward(
        do, q, k[:, past:], v[:, past:], o, lse, aux_d, causal=True, scale=scale
    )
    dq_p, dk_p, dv_p = lasp2h.attention_block_backward(
        do, q, k[:, :past], v[:, :past], o, lse, aux_p, causal=False, scale=scale
    )
    got = (o, dq_d + dq_p, torch.cat([dk_p, dk_d], 1), torch.cat([dv_p, dv_d], 1))
    ref = _reference(q, k, v, do, past)
    errs = {n: _rel(g, r) for n, g, r in zip(("o", "dq", "dk", "dv"), got, ref)}
    print(backend, (B, Tq, Hq, Hkv, D), {n: f"{e:.2e}" for n, e in errs.items()})
    assert all(e < 1e-2 for e in errs.values()), errs


def test_cudnn_is_the_default_on_hopper(monkeypatch):
    monkeypatch.delenv("LINSCALE_LASP2H_BACKEND", raising=False)
    q = torch.zeros(1, 8, 2, 128, device="cuda", dtype=torch.bfloat16)
    hopper = torch.cuda.get_device_capability() >= (9, 0)
    assert lasp2h._backend(q) == ("cudnn" if hopper else "flash")
    assert lasp2h._backend(q[..., :64].float()) == "math"
