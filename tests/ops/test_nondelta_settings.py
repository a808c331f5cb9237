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
