"""Triton kernels for the chunk-state scan of the gated delta rule (WY form).

Inputs are chunked fp32 tensors of ``S = N * H`` independent sequences (``[S, NC, C, D]``),
prepared in torch by :mod:`models.ops.triton_ops.delta`: the WY pseudo-values ``u = T beta v``
and ``w = T beta G k``, the scaled decayed queries ``qg = scale G q``, the scaled causal scores
``p = scale tril(q k^T G_i/G_j)``, the keys decayed to the chunk end ``kd`` and the chunk decay
``gam``. Per chunk, from the incoming state ``h`` ``[K, V]``::

    delta = u - w h;   o = qg h + p delta;   h' = gam h + kd^T delta

The state transition is a full KxK matrix, so V is split across programs (columns of the
state are independent) and K is held whole (BK >= K).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["delta_scan_fwd_kernel", "delta_scan_bwd_kernel"]


@triton.jit
def _tile(ptr, s, c, NC, R: tl.constexpr, D: tl.constexpr, offs_r, offs_d, mr, md):
    base = (s.to(tl.int64) * NC + c) * R
    return ptr + (base + offs_r[:, None]) * D + offs_d[None, :], mr[:, None] & md[None, :]


@triton.jit
def delta_scan_fwd_kernel(
    u_ptr,
    w_ptr,
    qg_ptr,
    p_ptr,
    kd_ptr,
    gam_ptr,
    h0_ptr,
    o_ptr,
    ht_ptr,
    hc_ptr,
    dlt_ptr,
    NC,
    C: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_H0: tl.constexpr,
    STORE_O: tl.constexpr,
    STORE_FINAL: tl.constexpr,
    STORE_STATES: tl.constexpr,
):
    """Forward scan; optionally stores o, the final state, and for the backward the state at
    every chunk start ``hc`` ``[S, NC, K, V]`` and ``delta`` ``[S, NC, C, V]``."""
    pid_v, s = tl.program_id(0), tl.program_id(1)
    offs_c = tl.arange(0, C)
    offs_k = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    mc = offs_c < C
    mk, mv = offs_k < K, offs_v < V
    hp, hm = _tile(h0_ptr, s, 0, 1, K, V, offs_k, offs_v, mk, mv)
    if HAS_H0:
        h = tl.load(hp, mask=hm, other=0.0)
    else:
        h = tl.zeros([BK, BV], tl.float32)
    for c in range(NC):
        up, um = _tile(u_ptr, s, c, NC, C, V, offs_c, offs_v, mc, mv)
        wp, wm = _tile(w_ptr, s, c, NC, C, K, offs_c, offs_k, mc, mk)
        kp, _ = _tile(kd_ptr, s, c, NC, C, K, offs_c, offs_k, mc, mk)
        delta = tl.load(up, mask=um, other=0.0) - tl.dot(tl.load(wp, mask=wm, other=0.0), h)
        if STORE_STATES:
            sp, sm = _tile(hc_ptr, s, c, NC, K, V, offs_k, offs_v, mk, mv)
            tl.store(sp, h, mask=sm)
            dp, _ = _tile(dlt_ptr, s, c, NC, C, V, offs_c, offs_v, mc, mv)
            tl.store(dp, delta, mask=um)
        if STORE_O:
            qp, _ = _tile(qg_ptr, s, c, NC, C, K, offs_c, offs_k, mc, mk)
            pp, pm = _tile(p_ptr, s, c, NC, C, C, offs_c, offs_c, mc, mc)
            o = tl.dot(tl.load(qp, mask=wm, other=0.0), h)
            o += tl.dot(tl.load(pp, mask=pm, other=0.0), delta)
            op, _ = _tile(o_ptr, s, c, NC, C, V, offs_c, offs_v, mc, mv)
            tl.store(op, o, mask=um)
        gam = tl.load(gam_ptr + s.to(tl.int64) * NC + c)
        h = gam * h + tl.dot(tl.trans(tl.load(kp, mask=wm, other=0.0)), delta)
    if STORE_FINAL:
        fp, fm = _tile(ht_ptr, s, 0, 1, K, V, offs_k, offs_v, mk, mv)
        tl.store(fp, h, mask=fm)


@triton.jit
def delta_scan_bwd_kernel(
    w_ptr,
    qg_ptr,
    p_ptr,
    kd_ptr,
    gam_ptr,
    do_ptr,
    dht_ptr,
    dd_ptr,
    dhc_ptr,
    dh0_ptr,
    NC,
    C: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_DHT: tl.constexpr,
):
    """Reverse scan of the adjoint ``dh`` (of the state at each chunk end)::

        ddelta = p^T do + kd dh;   dh_prev = gam dh + qg^T do - w^T ddelta

    stores ``ddelta`` ``[S, NC, C, V]``, the end-of-chunk adjoints ``dhc`` ``[S, NC, K, V]``
    and ``dh0``."""
    pid_v, s = tl.program_id(0), tl.program_id(1)
    offs_c = tl.arange(0, C)
    offs_k = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    mc = offs_c < C
    mk, mv = offs_k < K, offs_v < V
    if HAS_DHT:
        hp, hm = _tile(dht_ptr, s, 0, 1, K, V, offs_k, offs_v, mk, mv)
        dh = tl.load(hp, mask=hm, other=0.0)
    else:
        dh = tl.zeros([BK, BV], tl.float32)
    for i in range(NC):
        c = NC - 1 - i
        sp, sm = _tile(dhc_ptr, s, c, NC, K, V, offs_k, offs_v, mk, mv)
        tl.store(sp, dh, mask=sm)
        dp, dm = _tile(do_ptr, s, c, NC, C, V, offs_c, offs_v, mc, mv)
        do = tl.load(dp, mask=dm, other=0.0)
        pp, pm = _tile(p_ptr, s, c, NC, C, C, offs_c, offs_c, mc, mc)
        kp, km = _tile(kd_ptr, s, c, NC, C, K, offs_c, offs_k, mc, mk)
        dd = tl.dot(tl.trans(tl.load(pp, mask=pm, other=0.0)), do)
        dd += tl.dot(tl.load(kp, mask=km, other=0.0), dh)
        ddp, _ = _tile(dd_ptr, s, c, NC, C, V, offs_c, offs_v, mc, mv)
        tl.store(ddp, dd, mask=dm)
        qp, _ = _tile(qg_ptr, s, c, NC, C, K, offs_c, offs_k, mc, mk)
        wp, _ = _tile(w_ptr, s, c, NC, C, K, offs_c, offs_k, mc, mk)
        gam = tl.load(gam_ptr + s.to(tl.int64) * NC + c)
        dh = gam * dh + tl.dot(tl.trans(tl.load(qp, mask=km, other=0.0)), do)
        dh -= tl.dot(tl.trans(tl.load(wp, mask=km, other=0.0)), dd)
    fp, fm = _tile(dh0_ptr, s, 0, 1, K, V, offs_k, offs_v, mk, mv)
    tl.store(fp, dh, mask=fm)
