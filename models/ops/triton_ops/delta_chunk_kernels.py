"""Chunk-parallel Triton kernels of the gated delta rule that use the chunk-start states.

Tensors and chunk tables as in :mod:`.delta_kernels`; ``hc`` ``[NCh, H, K, V]`` holds the state
at each chunk start, ``dhc`` the adjoint of each chunk-end state, ``delta`` ``[TT, H, V]`` the
pseudo-values ``u - w h`` (fp32). With ``D_ij = exp(b_i - b_j)`` for ``i >= j``::

    o = scale (exp(b) q) h + scale (q k^T * D) delta
"""

from __future__ import annotations

import triton
import triton.language as tl

from models.ops.triton_ops.delta_kernels import _last_gate, _rows, _state, _tile

__all__ = ["delta_out_kernel", "delta_dqkw_kernel"]


@triton.jit
def delta_out_kernel(
    q_ptr,
    k_ptr,
    b_ptr,
    hc_ptr,
    dlt_ptr,
    o_ptr,
    bos_ptr,
    eos_ptr,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    """Output of one chunk, one V tile. Grid ``(cdiv(V, BV), NCh, H)``; K in tiles of BK."""
    pv, c, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows, mi, n_tok, lrow = _rows(bos_ptr, eos_ptr, c, h, H, C)
    offs_v = pv * BV + tl.arange(0, BV)
    r = tl.arange(0, C)
    bb = tl.load(b_ptr + rows, mask=mi, other=0.0)
    qk = tl.zeros([C, C], tl.float32)
    acc = tl.zeros([C, BV], tl.float32)
    for k0 in tl.static_range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        qp, km = _tile(q_ptr, rows, mi, K, offs_k)
        kp, _ = _tile(k_ptr, rows, mi, K, offs_k)
        qt = tl.load(qp, mask=km, other=0.0)
        qk += tl.dot(qt, tl.trans(tl.load(kp, mask=km, other=0.0)))
        sp, sm = _state(hc_ptr, c, h, H, K, V, offs_k, offs_v)
        st = tl.load(sp, mask=sm, other=0.0)
        acc += tl.dot((qt.to(tl.float32) * tl.exp(bb)[:, None]).to(st.dtype), st)
    # rows past the chunk's end load b as 0: masked here, so that exp cannot overflow there
    keep = (r[:, None] >= r[None, :]) & mi[:, None]
    dmat = tl.exp(tl.where(keep, bb[:, None] - bb[None, :], float("-inf")))
    dp, vm = _tile(dlt_ptr, rows, mi, V, offs_v)
    dl = tl.load(dp, mask=vm, other=0.0)
    acc += tl.dot((qk * dmat).to(dl.dtype), dl)
    op, _ = _tile(o_ptr, rows, mi, V, offs_v)
    tl.store(op, (acc * scale).to(o_ptr.dtype.element_ty), mask=vm)


@triton.jit
def delta_dqkw_kernel(
    q_ptr,
    k_ptr,
    b_ptr,
    hc_ptr,
    dhc_ptr,
    do_ptr,
    dlt_ptr,
    dd_ptr,
    dqp_ptr,
    dkp_ptr,
    dw_ptr,
    dbp_ptr,
    bos_ptr,
    eos_ptr,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    NKP: tl.constexpr,
):
    """Inter-chunk gradient parts of one chunk, one K tile. Grid ``(NKP, NCh, H)``.

    With h the chunk-start state and dh the chunk-end adjoint (V summed in tiles of BV)::

        dqp = scale exp(b) do h^T;   dkp = exp(b_C - b) delta dh^T;   dw = -dd h^T

    (fp32 ``[TT, H, K]``) and the matching part of the cumulative-gate gradient ``dbp``
    ``[TT, H, NKP]`` (one column per K tile): ``q.dqp - k.dkp``, plus on the chunk's last
    token ``sum(k.dkp) + exp(b_C) sum(h * dh)``.
    """
    pk, c, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows, mi, n_tok, lrow = _rows(bos_ptr, eos_ptr, c, h, H, C)
    offs_k = pk * BK + tl.arange(0, BK)
    dqa = tl.zeros([C, BK], tl.float32)
    dka = tl.zeros([C, BK], tl.float32)
    dwa = tl.zeros([C, BK], tl.float32)
    dgam = tl.zeros([BK], tl.float32)
    for v0 in tl.range(0, V, BV):
        offs_v = v0 + tl.arange(0, BV)
        dop, vm = _tile(do_ptr, rows, mi, V, offs_v)
        dlp, _ = _tile(dlt_ptr, rows, mi, V, offs_v)
        ddp, _ = _tile(dd_ptr, rows, mi, V, offs_v)
        sp, sm = _state(hc_ptr, c, h, H, K, V, offs_k, offs_v)
        st = tl.load(sp, mask=sm, other=0.0)
        sd = st.dtype  # storage dtype of the states and delta (products in it)
        dsp, _ = _state(dhc_ptr, c, h, H, K, V, offs_k, offs_v)
        dst = tl.load(dsp, mask=sm, other=0.0)
        do = tl.load(dop, mask=vm, other=0.0).to(sd)
        dqa += tl.dot(do, tl.trans(st))
        dka += tl.dot(tl.load(dlp, mask=vm, other=0.0), tl.trans(dst))
        dwa += tl.dot(tl.load(ddp, mask=vm, other=0.0).to(sd), tl.trans(st))
        dgam += tl.sum(st.to(tl.float32) * dst.to(tl.float32), 1)
    bb = tl.load(b_ptr + rows, mask=mi, other=0.0)
    bl = _last_gate(b_ptr, lrow, n_tok)
    qp, km = _tile(q_ptr, rows, mi, K, offs_k)
    kp, _ = _tile(k_ptr, rows, mi, K, offs_k)
    dqp = dqa * (scale * tl.exp(bb))[:, None]
    dkp = dka * tl.exp(bl - bb)[:, None]
    p, _ = _tile(dqp_ptr, rows, mi, K, offs_k)
    tl.store(p, dqp.to(dqp_ptr.dtype.element_ty), mask=km)
    p, _ = _tile(dkp_ptr, rows, mi, K, offs_k)
    tl.store(p, dkp.to(dkp_ptr.dtype.element_ty), mask=km)
    p, _ = _tile(dw_ptr, rows, mi, K, offs_k)
    tl.store(p, (-dwa).to(dw_ptr.dtype.element_ty), mask=km)
    kdk = tl.sum(tl.load(kp, mask=km, other=0.0).to(tl.float32) * dkp, 1)
    dbp = tl.sum(tl.load(qp, mask=km, other=0.0).to(tl.float32) * dqp, 1) - kdk
    tail = tl.sum(kdk, 0) + tl.exp(bl) * tl.sum(dgam, 0)
    dbp += tl.where(tl.arange(0, C) == n_tok - 1, tail, 0.0)
    tl.store(dbp_ptr + rows * NKP + pk, dbp, mask=mi)
