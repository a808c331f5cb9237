"""Launch settings of the Triton linear / scalar-decay / GLA kernels decided on the host."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from models.ops.triton_ops import nondelta  # noqa: E402


@pytest.mark.parametrize(
    ("dtype", "setting", "want"),
    [
        (torch.float32, None, True),  # tf32 products: only the exact in-chunk pairs cancel
        (torch.bfloat16, None, False),
        (torch.float16, None, False),
        (torch.float32, "auto", True),
        (torch.bfloat16, "exact", True),
        (torch.float32, "split", False),
    ],
)
def test_scalar_pairs_setting(monkeypatch, dtype, setting, want):
    if setting is None:
        monkeypatch.delenv("LINSCALE_KERNEL_SCALAR_PAIRS", raising=False)
    else:
        monkeypatch.setenv("LINSCALE_KERNEL_SCALAR_PAIRS", setting)
    assert nondelta._exact_pairs(dtype) is want


def test_scalar_pairs_setting_rejects_unknown_value(monkeypatch):
    monkeypatch.setenv("LINSCALE_KERNEL_SCALAR_PAIRS", "fp32")
    with pytest.raises(ValueError, match="LINSCALE_KERNEL_SCALAR_PAIRS='fp32'.*auto, exact, split"):
        nondelta._exact_pairs(torch.float32)


def test_per_head_gate_detection():
    """One log decay per head is recognised from the strides of a view expanded over B and T
    (how the lightning and retention layers pass it); anything that may vary per token or per
    sequence takes the per-token kernels."""
    H = 3
    per_head = torch.randn(H).view(1, 1, H)
    assert nondelta._per_head(per_head.expand(2, 5, H))
    assert nondelta._per_head(per_head.expand(1, 5, H))  # packed documents (cu_seqlens)
    assert nondelta._per_head(per_head.expand(2, 5, H)[:, 1:4])  # a slice of it
    assert nondelta._per_head(torch.randn(1, 1, H))  # one token: its gate is the decay
    assert not nondelta._per_head(per_head.expand(2, 5, H).contiguous())  # materialised
    assert not nondelta._per_head(torch.randn(2, 5, H))  # per token
    assert not nondelta._per_head(torch.randn(2, 1, H).expand(2, 5, H))  # per sequence
