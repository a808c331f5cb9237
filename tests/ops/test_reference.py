"""Chunked pure-torch references against the fp64 naive recurrence: forward, final state, grads."""

from __future__ import annotations

import pytest
import torch

import models.ops as ops
from models.ops import reference

from ._cases import VARIANTS, check_against_naive, make_inputs, run_op

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("T", [1, 63, 130])
def test_chunked_matches_naive(variant, T):
    x, cu = make_inputs(variant, 2, T, 2, 16, 8, seed=T)
    check_against_naive(reference, variant, x, cu, tol=1e-10, seed=T)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cu_seqlens_uneven_docs(variant):
    x, cu = make_inputs(variant, 1, 200, 2, 8, 16, n_docs=4, seed=7)
    check_against_naive(reference, variant, x, cu, tol=1e-10, seed=7)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cu_seqlens_empty_doc(variant):
    x, cu = make_inputs(variant, 1, 140, 2, 8, 8, n_docs=[0, 64, 64, 140], seed=9)
    check_against_naive(reference, variant, x, cu, tol=1e-10, seed=9)


@pytest.mark.parametrize("variant", ["gla", "gated_delta"])
def test_fp32_close_and_dtype(variant):
    x, cu = make_inputs(variant, 1, 100, 2, 16, 16, dtype=torch.float32, seed=3)
    check_against_naive(reference, variant, x, cu, tol=1e-4, seed=3)
    xb = {n: (t.bfloat16() if t is not None and n in ("q", "k", "v") else t) for n, t in x.items()}
    o, ht = run_op(reference, variant, xb, cu)
    assert o.dtype == torch.bfloat16 and ht.dtype == torch.float32


def test_no_final_state_and_default_scale():
    x, _ = make_inputs("linear", 1, 70, 1, 4, 4)
    o, ht = reference.chunk_linear_attn(x["q"], x["k"], x["v"], output_final_state=False)
    assert ht is None
    o2, _ = ops.naive_linear_attn(x["q"], x["k"], x["v"], scale=4**-0.5)
    torch.testing.assert_close(o, o2)


def test_dispatcher_picks_reference_on_cpu(monkeypatch):
    x, _ = make_inputs("scalar", 1, 20, 1, 4, 4)
    want, _ = reference.chunk_linear_attn(x["q"], x["k"], x["v"], x["g"])
    got, _ = ops.chunk_linear_attn(x["q"], x["k"], x["v"], x["g"])
    torch.testing.assert_close(got, want)
    got, _ = ops.chunk_linear_attn(x["q"], x["k"], x["v"], x["g"], backend="reference")
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError):
        ops.chunk_linear_attn(x["q"], x["k"], x["v"], backend="cuda")
    monkeypatch.setenv("LINSCALE_OPS_BACKEND", "bogus")
    with pytest.raises(ValueError):
        ops.chunk_linear_attn(x["q"], x["k"], x["v"])


def test_kernel_environment_settings_are_checked(monkeypatch):
    """A malformed kernel setting is an error naming the variable, not a silent default."""
    pytest.importorskip("triton")
    from models.ops.triton_ops.common import env_setting, make_groups

    monkeypatch.setenv("LINSCALE_KERNEL_GROUP_TOKENS", "many")
    with pytest.raises(ValueError, match="LINSCALE_KERNEL_GROUP_TOKENS='many'"):
        make_groups(1, 256, None, chunk=64, programs_per_group=1, device=torch.device("cpu"))
    monkeypatch.setenv("LINSCALE_KERNEL_GATED_BWD_WARPS", "3")
    with pytest.raises(ValueError, match="expected one of 4, 8"):
        env_setting("LINSCALE_KERNEL_GATED_BWD_WARPS", 4, (4, 8))
    monkeypatch.setenv("LINSCALE_KERNEL_GATED_BWD_WARPS", "8")
    assert env_setting("LINSCALE_KERNEL_GATED_BWD_WARPS", 4, (4, 8)) == 8
