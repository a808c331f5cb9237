"""kv_state (a slice's state from zero, for LASP-2's pieces) against einsum, fwd and bwd."""

from __future__ import annotations

import pytest
import torch

from parallel.kv_state import kv_state


def _inputs(dtype, N=2, T=37, H=3, K=5, V=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(N, T, H, K, generator=gen, dtype=torch.float64)
    v = torch.randn(N, T, H, V, generator=gen, dtype=torch.float64)
    return k.to(dtype), v.to(dtype)


def _out(k):
    return torch.float64 if k.dtype == torch.float64 else torch.float32


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_gradcheck_fp64():
    k, v = (x.requires_grad_() for x in _inputs(torch.float64, T=9))
    assert kv_state(k, v, _out(k)).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda a, b: kv_state(a, b, torch.float64), (k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_einsum(dtype):
    """fp32 result (fp32 accumulation of 16-bit products), gradients in the inputs' dtype."""
    k, v = (x.requires_grad_() for x in _inputs(dtype))
    m = kv_state(k, v, _out(k))
    assert m.dtype == torch.float32 and m.shape == (2, 3, 5, 7)
    kd, vd = (x.detach().double().requires_grad_() for x in (k, v))
    ref = torch.einsum("nthk,nthv->nhkv", kd, vd)
    assert _rel(m, ref) < 1e-6
    dm = torch.randn(m.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dk, dv = torch.autograd.grad(m, (k, v), dm.float())
    dk_r, dv_r = torch.autograd.grad(ref, (kd, vd), dm)
    assert dk.dtype == dtype and dk.shape == k.shape and dv.shape == v.shape
    # token-major storage, like the op's own dk, dv: autograd's sum of the two is a plain add
    assert dk.is_contiguous() and dv.is_contiguous()
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert _rel(dk, dk_r) < tol and _rel(dv, dv_r) < tol


def test_only_needed_gradients():
    k, v = _inputs(torch.float32)
    v.requires_grad_()
    (dv,) = torch.autograd.grad(kv_state(k, v, _out(k)).sum(), (v,))
    assert torch.allclose(dv, k.sum(-1, keepdim=True).expand_as(v), atol=1e-5)


def test_bad_inputs_are_named():
    k, v = _inputs(torch.float32)
    with pytest.raises(ValueError, match=r"kv_state: k \(2, 37, 3, 5\)"):
        kv_state(k, v[:, :-1], torch.float32)
    with pytest.raises(ValueError, match="one dtype"):
        kv_state(k, v.double(), torch.float32)
