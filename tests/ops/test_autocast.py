"""The ops ignore an enclosing autocast: the trainer runs the model under bf16 autocast, and the
ops' fp32 internals (gates, WY products, states) must stay fp32 there."""

from __future__ import annotations

import pytest
import torch

import models.ops as ops
from models.ops import reference


@pytest.mark.parametrize("name", ["chunk_linear_attn", "chunk_gla", "chunk_gated_delta_rule"])
def test_ops_are_autocast_agnostic(name):
    torch.manual_seed(0)
    B, T, H, K = 1, 70, 2, 16
    q, k, v = (torch.randn(B, T, H, K) for _ in range(3))
    k = torch.nn.functional.normalize(k, dim=-1)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H))
    gates = {
        "chunk_linear_attn": (g,),
        "chunk_gla": (torch.nn.functional.logsigmoid(torch.randn(B, T, H, K)),),
        "chunk_gated_delta_rule": (g, torch.rand(B, T, H)),
    }[name]
    plain, _ = getattr(ops, name)(q, k, v, *gates)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under, _ = getattr(ops, name)(q, k, v, *gates)
        raw, _ = getattr(reference, name)(q, k, v, *gates)
    torch.testing.assert_close(under, plain, rtol=0, atol=0)
    # Without the guard, autocast changes the result: the guard is doing real work.
    assert (raw.float() - plain).abs().max() > 1e-4


def test_broken_triton_on_gpu_is_not_silent(monkeypatch):
    """auto + CUDA tensors + kernels that fail to import: a warning names the error."""
    monkeypatch.setattr(ops, "_triton_module", lambda: None)
    monkeypatch.setattr(ops, "_TRITON_ERROR", ["ImportError: no triton"])
    monkeypatch.setattr(ops, "_WARNED", [])

    class FakeCuda:
        is_cuda = True

    with pytest.warns(RuntimeWarning, match="no triton"):
        fn = ops._pick("chunk_linear_attn", FakeCuda(), "auto")
    assert fn is reference.chunk_linear_attn
    with pytest.raises(RuntimeError, match="no triton"):
        ops._pick("chunk_linear_attn", FakeCuda(), "triton")
