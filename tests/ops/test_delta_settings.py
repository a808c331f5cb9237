"""Launch settings of the Triton gated delta rule that are decided on the host (no kernel runs)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from models.ops.triton_ops import delta, delta_scan  # noqa: E402
from models.ops.triton_ops.common import make_groups  # noqa: E402


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
    monkeypatch.setattr(delta_scan, "num_sms", lambda device: 132)
    for name in ("LINSCALE_DELTA_SCAN_BV", "LINSCALE_DELTA_SCAN_FWD_BV"):
        monkeypatch.delenv(name, raising=False)
    for name, val in env.items():
        monkeypatch.setenv(name, val)
    dev = torch.device("cpu")
    assert delta_scan.scan_bv(n_seq, 16, 128, dev, fwd=True) == want_fwd
    assert delta_scan.scan_bv(n_seq, 16, 128, dev) == want_bwd


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


@pytest.mark.parametrize(
    ("n_seq", "K", "avg_chunks", "env", "want"),
    [
        (8, 128, 128, None, 0),  # 8K x 8: whole sequences fill 132 SMs
        (2, 128, 512, None, 0),  # 32K x 2: 256 programs of 16 columns, measured faster whole
        (37, 128, 28, None, 0),  # packed documents: many sequences
        (1, 128, 2048, None, 64),  # one 128K sequence: 32 segments of 64 chunks
        (1, 256, 2048, None, 0),  # K over 128: never cut
        (1, 128, 63, None, 0),  # not cut unless into two segments of 32 chunks or more
        (1, 128, 64, None, 32),
        (1, 128, 2048, "0", 0),  # never cut
        (8, 128, 128, "4", 4),  # forced
    ],
)
def test_segment_chunks(monkeypatch, n_seq, K, avg_chunks, env, want):
    monkeypatch.setattr(delta_scan, "num_sms", lambda device: 132)
    if env is None:
        monkeypatch.delenv("LINSCALE_DELTA_SCAN_SEGMENT", raising=False)
    else:
        monkeypatch.setenv("LINSCALE_DELTA_SCAN_SEGMENT", env)
    dev = torch.device("cpu")
    assert delta_scan.segment_chunks(n_seq, 16, K, 128, avg_chunks, dev) == want


@pytest.mark.parametrize(("value", "K", "match"), [("-1", 128, ">= 0"), ("8", 256, "K <= 128")])
def test_segment_chunks_rejects(monkeypatch, value, K, match):
    monkeypatch.setenv("LINSCALE_DELTA_SCAN_SEGMENT", value)
    with pytest.raises(ValueError, match=f"LINSCALE_DELTA_SCAN_SEGMENT.*{match}"):
        delta_scan.segment_chunks(1, 16, K, 128, 2048, torch.device("cpu"))


def test_plan_scan_segments_cover_each_sequence(monkeypatch):
    """Segments of 3 chunks over documents of 0, 7, 1 and 6 chunks (ragged ends): each run's
    chunk range lies inside one document, the runs tile the chunk table in order, and each
    document's runs are listed by the segment table."""
    monkeypatch.setenv("LINSCALE_DELTA_SCAN_SEGMENT", "3")
    cu = torch.tensor([0, 0, 400, 440, 800])
    grp = make_groups(
        1, 800, cu, chunk=64, programs_per_group=1, device=torch.device("cpu"), group_tokens=64
    )
    plan = delta_scan.plan_scan(grp, 1, 800, cu, 1, 128, 128)
    run_c = plan.run_c.tolist()
    assert run_c[0] == 0 and run_c[-1] == grp.n_groups == 14
    assert all(a < b for a, b in zip(run_c, run_c[1:]))
    seq_s0 = plan.segs.seq_g0.tolist()
    assert seq_s0 == [0, 0, 3, 4, 6]  # 7 chunks -> 3 + 3 + 1; 1 -> 1; 6 -> 3 + 3
    bos, eos = grp.bos.tolist(), grp.eos.tolist()
    for n in range(4):
        for s in range(seq_s0[n], seq_s0[n + 1]):
            first, last = run_c[s], run_c[s + 1] - 1
            assert cu[n] <= bos[first] and eos[last] <= cu[n + 1]
            assert last - first + 1 <= 3
    monkeypatch.setenv("LINSCALE_DELTA_SCAN_SEGMENT", "0")
    whole = delta_scan.plan_scan(grp, 1, 800, cu, 1, 128, 128)
    assert whole.segs is None and whole.run_c.tolist() == [0, 0, 7, 8, 14]


@pytest.mark.parametrize(
    ("env", "K", "store", "want"),
    [
        (None, 128, torch.bfloat16, True),
        (None, 256, torch.bfloat16, False),  # spills in the scan
        (None, 128, torch.float32, False),
        ("on", 256, torch.float32, True),
        ("off", 128, torch.bfloat16, False),
    ],
)
def test_local_dd_setting(monkeypatch, env, K, store, want):
    if env is None:
        monkeypatch.delenv("LINSCALE_DELTA_LOCAL_DD", raising=False)
    else:
        monkeypatch.setenv("LINSCALE_DELTA_LOCAL_DD", env)
    assert delta._local_dd(K, store) == want
