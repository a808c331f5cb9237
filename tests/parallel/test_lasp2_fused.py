"""LASP-2 inside the Triton op (the serial schedule's exchange form, ``models.ops.exchange_op``)
is exact: forward and every gradient against the fp64 naive recurrence, W = 2 and 3, both
layouts, no decay / scalar / fixed per-head decays (the per-head kernels) / GLA, several chunks
and groups per slice with a ragged last chunk (Triton interpreter on CPU, gloo)."""

from __future__ import annotations

import pytest
import torch

from tests.dist_harness import run_ranks
from tests.parallel.lasp2_cases import lasp2_inputs, naive_reference, serial_rank_run

_ENV = {
    "TRITON_INTERPRET": "1",
    "LINSCALE_OPS_BACKEND": "triton",
    # One 64-token chunk per group: the scans over groups, run twice around the exchange,
    # see several groups per slice.
    "LINSCALE_KERNEL_GROUP_TOKENS": "64",
}


def _inputs(family: str, T: int):
    return lasp2_inputs(family, T, seed=11, K=16, V=32, gate_shift=2.0)


def _worker(rank, world, family, layout, T):
    from parallel import lasp2
    from parallel.sequence_shard import shard_sequence

    q, k, v, gates = _inputs(family, T)
    fam = "gla" if family == "gla" else "linear_attn"
    # The exchange form is what runs: the Triton op with only the backend chosen.
    q_local = shard_sequence(q, dim=1, rank=rank, world=world, layout=layout)
    assert lasp2._exchange_op(fam, lasp2.resolve_op(fam), q_local) is not None
    return serial_rank_run(rank, world, family, layout, q, k, v, gates)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("family", ["linear", "scalar", "fixed", "gla"])
def test_lasp2_in_the_op_is_exact(world, layout, family):
    from parallel.sequence_shard import shard_sequence

    T = 2 * world * 75  # 150 tokens per rank, 75 per zigzag slice: ragged 64-token chunks
    q, k, v, gates = _inputs(family, T)
    o_ref, grads_ref = naive_reference(family, q, k, v, gates)
    results = run_ranks(_worker, world, family, layout, T, env=_ENV)
    for rank, (o, grads) in enumerate(results):
        kw = {"dim": 1, "rank": rank, "world": world, "layout": layout}
        ref = shard_sequence(o_ref, **kw)
        torch.testing.assert_close(o.double(), ref, rtol=2e-4, atol=2e-4 * ref.abs().max())
        for name, g, g_ref in zip(["q", "k", "v", "g"], grads, grads_ref):
            ref = shard_sequence(g_ref, **kw)
            torch.testing.assert_close(
                g.double(),
                ref,
                rtol=2e-4,
                atol=2e-4 * ref.abs().max(),
                msg=lambda m, n=name: f"d{n}: {m}",
            )


def test_exchange_refuses_initial_state():
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")
    from models.ops.triton_ops.nondelta import nondelta_attn

    q = torch.zeros(1, 8, 1, 16)
    with pytest.raises(ValueError, match="exchange takes no initial_state"):
        nondelta_attn(q, q, q, None, 0, initial_state=torch.zeros(1, 1, 16, 16), exchange=object())


def _detect_worker(rank, world):
    import functools
    import os

    import models.ops as ops
    from parallel import lasp2

    x = torch.zeros(1, 4, 1, 16)
    base = ops.chunk_linear_attn
    seen = {
        "plain": lasp2._exchange_op("linear_attn", base, x) is not None,
        # What apply_sequence_parallel passes: the layer's op with its backend bound.
        "triton": lasp2._exchange_op("linear_attn", functools.partial(base, backend="triton"), x)
        is not None,
        "gla": lasp2._exchange_op("gla", ops.chunk_gla, x) is not None,
        "reference": lasp2._exchange_op(
            "linear_attn", functools.partial(base, backend="reference"), x
        )
        is not None,
        "other_kwargs": lasp2._exchange_op("linear_attn", functools.partial(base, scale=0.5), x)
        is not None,
        "custom": lasp2._exchange_op("linear_attn", lambda *a, **k: None, x) is not None,
        "delta": lasp2._exchange_op("gated_delta_rule", ops.chunk_gated_delta_rule, x) is not None,
    }
    os.environ["LINSCALE_LASP2_FUSED"] = "off"
    seen["off"] = lasp2._exchange_op("linear_attn", base, x) is not None
    os.environ["LINSCALE_LASP2_FUSED"] = "sometimes"
    try:
        lasp2._exchange_op("linear_attn", base, x)
        seen["bad"] = "accepted"
    except ValueError as e:
        seen["bad"] = str(e)
    return seen


def test_exchange_form_is_picked_only_for_the_triton_op():
    (seen,) = run_ranks(_detect_worker, 1, env=_ENV)
    assert seen["plain"] and seen["triton"] and seen["gla"]
    assert not seen["reference"] and not seen["other_kwargs"] and not seen["custom"]
    assert not seen["delta"]  # the gated delta rule has its own LASP-2 form
    assert not seen["off"]
    assert "LINSCALE_LASP2_FUSED" in seen["bad"] and "auto" in seen["bad"]
