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
        (torch.float16, None, torch.float32),  # fp16's range is too narrow for the adjoints
        (torch.float32, None, torch.float32),
        (torch.bfloat16, "fp32", torch.float32),
        (torch.float32, "auto", torch.float32),
    ],
)
def test_store_dtype_follows_bf16_inputs(monkeypatch, dtype, setting, want):
    if setting is None:
        monkeypatch.delenv("LINSCALE_DELTA_STORE", raising=False)
    else:
        monkeypatch.setenv("LINSCALE_DELTA_STORE", setting)
    assert delta._store_dtype(torch.zeros(2, dtype=dtype)) == want


def test_store_dtype_rejects_unknown_value(monkeypatch):
    monkeypatch.setenv("LINSCALE_DELTA_STORE", "bf16")
    with pytest.raises(ValueError, match="LINSCALE_DELTA_STORE='bf16'.*auto, fp32"):
        delta._store_dtype(torch.zeros(2, dtype=torch.bfloat16))


@pytest.mark.parametrize(
    ("n_seq", "env", "want_fwd", "want_bwd"),
    [
        (8, {}, 64, 32),  # 8 x 16 heads: 64-wide forward tiles still fill 132 SMs
        (1, {}, 16, 16),  # one sequence: the narrowest tiles in both scans
        (8, {"LINSCALE_DELTA_SCAN_BV": "16"}, 16, 16),  # overrides both
        (1, {"LINSCALE_DELTA_SCAN_FWD_BV": "32"}, 32, 16),  # overrides the forward one only
    ],
)
def test_scan_tiles(monkeypatch, n_seq, env, want_fwd, want_bwd):
    monkeypatch.setattr(delta, "num_sms", lambda device: 132)
    for name in ("LINSCALE_DELTA_SCAN_BV", "LINSCALE_DELTA_SCAN_FWD_BV"):
        monkeypatch.delenv(name, raising=False)
    for name, val in env.items():
        monkeypatch.setenv(name, val)
    dev = torch.device("cpu")
    assert delta._scan_bv(n_seq, 16, 128, dev, fwd=True) == want_fwd
    assert delta._scan_bv(n_seq, 16, 128, dev) == want_bwd


def test_bf16_only_product_modes(monkeypatch):
    for name in (
        "LINSCALE_DELTA_WYBWD_LOWP",
        "LINSCALE_DELTA_UW_PREC",
        "LINSCALE_DELTA_SOLVE_PREC",
    ):
        monkeypatch.delenv(name, raising=False)

    class OnCuda:  # what _prec reads of its tensor
        def __init__(self, dtype):
            self.device, self.dtype = torch.device("cuda"), dtype

    assert delta._wybwd_lowp(torch.zeros(1, dtype=torch.bfloat16))
    assert not delta._wybwd_lowp(torch.zeros(1, dtype=torch.float16))
    assert delta._prec(OnCuda(torch.bfloat16))["UW_PREC"] == "lowp"
    assert delta._prec(OnCuda(torch.float16))["UW_PREC"] == "tf32"
    assert delta._prec(OnCuda(torch.float32)) == {"PREC": "tf32x3", "UW_PREC": "tf32x3"}
    monkeypatch.setenv("LINSCALE_DELTA_WYBWD_LOWP", "off")
    assert not delta._wybwd_lowp(torch.zeros(1, dtype=torch.bfloat16))


def test_keep_w_setting(monkeypatch):
    monkeypatch.delenv("LINSCALE_DELTA_KEEP_W", raising=False)
    assert delta._keep_w()
    monkeypatch.setenv("LINSCALE_DELTA_KEEP_W", "off")
    assert not delta._keep_w()
    monkeypatch.setenv("LINSCALE_DELTA_KEEP_W", "yes")
    with pytest.raises(ValueError, match="LINSCALE_DELTA_KEEP_W='yes'.*on, off"):
        delta._keep_w()
