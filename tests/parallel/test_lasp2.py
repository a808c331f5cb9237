"""LASP-2 / LASP-2H against the single-device fp64 reference, on 2, 3 and 4 gloo ranks.

One process group per world size runs every case (see ``sp_worker.py``); each case here reports
one of them. Plus the degenerate single-rank path and argument errors, in-process.
"""

from __future__ import annotations

import pytest
import torch
from sp_harness import check_case
from sp_worker import case_names, make_inputs

from models.ops import naive
from parallel.lasp2 import lasp2_gated_delta_rule, lasp2_gla, lasp2_linear_attn
from parallel.lasp2h import lasp2h_attention

WORLDS = (2, 3, 4)
CASES = [c for c in case_names("ops", 2) if c.startswith(("lasp2", "count"))]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("world", WORLDS)
def test_sp_case(world: int, case: str) -> None:
    check_case("ops", world, case)


def test_world_one_is_the_op() -> None:
    """Without a process group (one rank) every LASP-2 op is the single-device op."""
    x = make_inputs("delta", 20, seed=0)
    o = lasp2_gated_delta_rule(
        x["q"],
        x["k"],
        x["v"],
        x["g"],
        x["beta"],
        group=None,
        layout="zigzag",
        op=naive.naive_gated_delta_rule,
    )
    ref = naive.naive_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"])[0]
    torch.testing.assert_close(o, ref, rtol=0, atol=0)
    x = make_inputs("gla", 20, seed=0)
    o = lasp2_gla(x["q"], x["k"], x["v"], x["gk"], group=None, op=naive.naive_gla)
    torch.testing.assert_close(o, naive.naive_gla(x["q"], x["k"], x["v"], x["gk"])[0])
    q = torch.randn(1, 10, 4, 8)
    k = torch.randn(1, 10, 2, 8)
    o = lasp2h_attention(q, k, k, group=None)
    assert o.shape == q.shape


def test_argument_errors() -> None:
    q = torch.randn(1, 9, 2, 4)
    with pytest.raises(ValueError, match="layout"):
        lasp2_linear_attn(q, q, q, group=None, layout="ring")
    with pytest.raises(ValueError, match="T_local"):
        lasp2_linear_attn(q, q, q, group=None, layout="zigzag")
    with pytest.raises(ValueError, match="Hkv"):
        lasp2h_attention(q, q[:, :, :1, :3], q[:, :, :1, :3], group=None)


def test_lasp2h_backend_setting(monkeypatch) -> None:
    """The block backend: math on CPU by default; a forced value is checked by name."""
    from parallel.lasp2h import attention_block_forward

    q = torch.randn(1, 6, 2, 8)
    monkeypatch.delenv("LINSCALE_LASP2H_BACKEND", raising=False)
    o, lse, aux = attention_block_forward(q, q, q, causal=True, scale=0.5)
    assert aux is None and lse.shape == (1, 2, 6)
    monkeypatch.setenv("LINSCALE_LASP2H_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="LINSCALE_LASP2H_BACKEND='cudnn' needs CUDA"):
        attention_block_forward(q, q, q, causal=True, scale=0.5)
    monkeypatch.setenv("LINSCALE_LASP2H_BACKEND", "fa3")
    with pytest.raises(ValueError, match="LINSCALE_LASP2H_BACKEND='fa3': expected one of"):
        attention_block_forward(q, q, q, causal=True, scale=0.5)
