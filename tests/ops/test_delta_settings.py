"""Launch settings of the Triton gated delta rule that are decided on the host (no kernel runs)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from models.ops.triton_ops import delta  # noqa: E402


@pytest.mark.parametrize(
    ("dtype", "setting", "want"),
    [
        (torch.bfloat16, None, torch.bfloat16),
        (torch.float16, None, torch.float16),
        (torch.float32, None, torch.float32),
        (torch.bfloat16, "fp32", torch.float32),
        (torch.float32, "auto", torch.float32),
    ],
)
def test_store_dtype_follows_16_bit_inputs(monkeypatch, dtype, setting, want):
    if setting is None:
        monkeypatch.delenv("LINSCALE_DELTA_STORE", raising=False)
    else:
        monkeypatch.setenv("LINSCALE_DELTA_STORE", setting)
    assert delta._store_dtype(torch.zeros(2, dtype=dtype)) == want


def test_store_dtype_rejects_unknown_value(monkeypatch):
    monkeypatch.setenv("LINSCALE_DELTA_STORE", "bf16")
    with pytest.raises(ValueError, match="LINSCALE_DELTA_STORE='bf16'.*auto, fp32"):
        delta._store_dtype(torch.zeros(2, dtype=torch.bfloat16))
