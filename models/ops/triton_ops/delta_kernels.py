"""Triton kernels of the gated delta rule: shared helpers and the two chunk-state scans.

Tensors are token-major as the op receives them, ``[TT, H, D]`` (``TT = B * T`` packed tokens);
a chunk is ``C = 64`` consecutive tokens ``bos <= t < eos`` of one sequence (the last chunk of a
sequence may be partial; its rows past ``eos`` are masked to zero). Per-chunk states are
``[NCh, H, K, V]`` fp32, indexed by the global chunk id of the chunk table (``seq_g0[n]`` is the
first chunk of sequence ``n``). With ``b`` the in-chunk inclusive cumulative log gate, ``b_C``
its value on the chunk's last token and ``(u, w)`` the WY pseudo-values of
:mod:`.delta_wy_kernels`, one chunk of the recurrence is::

    delta = u - w h;   h' = exp(b_C) h + (k exp(b_C - b))^T delta

The state transition is a full KxK matrix, so V is split across programs (state columns are
independent) and K is held whole (BK = next_pow2(K) >= K).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["delta_scan_fwd_kernel", "delta_scan_bwd_kernel", "delta_seg_combine_kernel"]


@triton.jit
def _rows(bos_ptr, eos_ptr, c, h, H: tl.constexpr, C: tl.constexpr):
    """Row indices ``t * H + h`` (int64) of the chunk's tokens, their mask, the chunk length and
    the row of its last token."""
    bos = tl.load(bos_ptr + c)
    eos = tl.load(eos_ptr + c)
    offs = tl.arange(0, C)
    mi = bos + offs < eos
    return (bos + offs).to(tl.int64) * H + h, mi, eos - bos, (eos - 1).to(tl.int64) * H + h


@triton.jit
def _tile(ptr, rows, mi, D: tl.constexpr, offs_d):
    """Pointers and mask of a ``[C, len(offs_d)]`` tile of a ``[TT, H, D]`` tensor."""
    return ptr + rows[:, None] * D + offs_d[None, :], mi[:, None] & (offs_d < D)[None, :]


@triton.jit
def _state(ptr, idx, h, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, offs_k, offs_v):
    """Pointers and mask of a ``[BK, BV]`` tile of state ``idx`` of a ``[*, H, K, V]`` tensor."""
    base = (idx.to(tl.int64) * H + h) * K
    ptrs = ptr + (base + offs_k[:, None]) * V + offs_v[None, :]
    return ptrs, (offs_k < K)[:, None] & (offs_v < V)[None, :]


@triton.jit
def _last_gate(b_ptr, lrow, n_tok):
    """Cumulative log gate ``b_C`` of the chunk's last token (0 for an empty chunk)."""
    return tl.load(b_ptr + lrow, mask=n_tok > 0, other=0.0)


@triton.jit
def delta_scan_fwd_kernel(
    k_ptr,
    w_ptr,
    u_ptr,
    b_ptr,
    h0_ptr,
    hc_ptr,
    dlt_ptr,
    ht_ptr,
    bos_ptr,
    eos_ptr,
    seq_g0,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_H0: tl.constexpr,
    STORE_FINAL: tl.constexpr,
    STORE_CHUNKS: tl.constexpr = True,
    TRANSITION: tl.constexpr = False,
):
    """Forward scan of sequence ``n``, head ``h``, one V tile. Grid ``(cdiv(V, BV), N, H)``.

    Stores the state at every chunk start ``hc`` ``[NCh, H, K, V]`` and ``delta`` ``[TT, H, V]``
    (if STORE_CHUNKS) and, if asked, the final state ``ht`` ``[N, H, K, V]``. A "sequence" is
    any run of chunks ``seq_g0[n] <= c < seq_g0[n + 1]`` (a segment of one, see
    :func:`delta_seg_combine_kernel`). TRANSITION: the product of the run's chunk transitions
    ``M = exp(b_C) I - (k exp(b_C - b))^T w`` instead, i.e. the same scan started from the
    identity with u = 0 (V must then be K; u, hc, delta are not touched), stored as ``ht``.
    """
    pv, n, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_k = tl.arange(0, BK)
    offs_v = pv * BV + tl.arange(0, BV)
    c0 = tl.load(seq_g0 + n)
    c1 = tl.load(seq_g0 + n + 1)
    p0, m0 = _state(h0_ptr, n, h, H, K, V, offs_k, offs_v)  # names apart from the loop's
    if TRANSITION:
        st = tl.where((offs_k[:, None] == offs_v[None, :]) & m0, 1.0, 0.0)
    elif HAS_H0:
        st = tl.load(p0, mask=m0, other=0.0).to(tl.float32)
    else:
        st = tl.zeros([BK, BV], tl.float32)
    for i in range(c1 - c0):
        c = c0 + i
        rows, mi, n_tok, lrow = _rows(bos_ptr, eos_ptr, c, h, H, C)
        if STORE_CHUNKS:
            sp, sm = _state(hc_ptr, c, h, H, K, V, offs_k, offs_v)
            tl.store(sp, st.to(hc_ptr.dtype.element_ty), mask=sm)
        up, um = _tile(u_ptr, rows, mi, V, offs_v)
        wp, wm = _tile(w_ptr, rows, mi, K, offs_k)
        kp, _ = _tile(k_ptr, rows, mi, K, offs_k)
        w = tl.load(wp, mask=wm, other=0.0)
        sd = w.dtype  # storage dtype of u, w, delta and the states (products in it)
        if TRANSITION:
            delta = -tl.dot(w, st.to(sd))
        else:
            delta = tl.load(up, mask=um, other=0.0).to(tl.float32) - tl.dot(w, st.to(sd))
        delta = delta.to(sd)
        if STORE_CHUNKS:
            dp, _ = _tile(dlt_ptr, rows, mi, V, offs_v)
            tl.store(dp, delta, mask=um)
        bb = tl.load(b_ptr + rows, mask=mi, other=0.0)
        bl = _last_gate(b_ptr, lrow, n_tok)
        kd = tl.load(kp, mask=wm, other=0.0).to(tl.float32) * tl.exp(bl - bb)[:, None]
        st = tl.exp(bl) * st + tl.dot(tl.trans(kd.to(sd)), delta)
    if STORE_FINAL:
        p1, m1 = _state(ht_ptr, n, h, H, K, V, offs_k, offs_v)
        tl.store(p1, st, mask=m1)


@triton.jit
def delta_scan_bwd_kernel(
    q_ptr,
    k_ptr,
    w_ptr,
    b_ptr,
    do_ptr,
    dd_ptr,
    dht_ptr,
    dhc_ptr,
    dh0_ptr,
    bos_ptr,
    eos_ptr,
    seq_g0,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_DHT: tl.constexpr,
    STORE_CHUNKS: tl.constexpr = True,
    LOCAL_DD: tl.constexpr = False,
):
    """Reverse scan of the state adjoint ``dh`` (of each chunk-end state). Grid as the forward.

    ``dd`` ``[TT, H, V]`` holds the chunk-local part ``scale P^T do`` on entry (unless LOCAL_DD:
    then the scan forms it from the q and k it loads anyway, ``P = tril(q k^T) * D``) and the
    full ``d delta = scale P^T do + k exp(b_C - b) dh`` on exit; per chunk, from the last::

        dh_prev = exp(b_C) dh + scale (exp(b) q)^T do - w^T d delta

    Stores the chunk-end adjoints ``dhc`` ``[NCh, H, K, V]`` and the full d delta (if
    STORE_CHUNKS; else dd and dhc are only read) and ``dh0`` ``[N, H, K, V]``.
    """
    pv, n, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_k = tl.arange(0, BK)
    offs_v = pv * BV + tl.arange(0, BV)
    c0 = tl.load(seq_g0 + n)
    c1 = tl.load(seq_g0 + n + 1)
    p0, m0 = _state(dht_ptr, n, h, H, K, V, offs_k, offs_v)  # names apart from the loop's
    if HAS_DHT:
        dh = tl.load(p0, mask=m0, other=0.0).to(tl.float32)
    else:
        dh = tl.zeros([BK, BV], tl.float32)
    for i in range(c1 - c0):
        c = c1 - 1 - i
        rows, mi, n_tok, lrow = _rows(bos_ptr, eos_ptr, c, h, H, C)
        if STORE_CHUNKS:
            sp, sm = _state(dhc_ptr, c, h, H, K, V, offs_k, offs_v)
            tl.store(sp, dh.to(dhc_ptr.dtype.element_ty), mask=sm)
        bb = tl.load(b_ptr + rows, mask=mi, other=0.0)
        bl = _last_gate(b_ptr, lrow, n_tok)
        kp, km = _tile(k_ptr, rows, mi, K, offs_k)
        wp, _ = _tile(w_ptr, rows, mi, K, offs_k)
        w = tl.load(wp, mask=km, other=0.0)
        sd = w.dtype  # storage dtype of w and the states (products in it)
        kraw = tl.load(kp, mask=km, other=0.0)
        kd = kraw.to(tl.float32) * tl.exp(bl - bb)[:, None]
        qp, _ = _tile(q_ptr, rows, mi, K, offs_k)
        qraw = tl.load(qp, mask=km, other=0.0)
        ddp, dm = _tile(dd_ptr, rows, mi, V, offs_v)
        dop, _ = _tile(do_ptr, rows, mi, V, offs_v)
        do = tl.load(dop, mask=dm, other=0.0).to(sd)
        if LOCAL_DD:
            # rows past the chunk's end are masked here, not only zero in q: their b loads as
            # 0, so exp(b_i - b_j) overflows there under strong gates, and inf * 0 is NaN
            r = tl.arange(0, C)
            keep = (r[:, None] >= r[None, :]) & mi[:, None]
            dmat = tl.where(keep, bb[:, None] - bb[None, :], float("-inf"))
            pt = tl.trans(tl.dot(qraw, tl.trans(kraw)) * tl.exp(dmat) * scale)
            dd = tl.dot(pt.to(sd), do)
        else:
            dd = tl.load(ddp, mask=dm, other=0.0).to(tl.float32)
        dd = dd + tl.dot(kd.to(sd), dh.to(sd))
        dd = dd.to(dd_ptr.dtype.element_ty)
        if STORE_CHUNKS:
            tl.store(ddp, dd, mask=dm)
        qg = qraw.to(tl.float32) * (scale * tl.exp(bb))[:, None]
        dh = tl.exp(bl) * dh + tl.dot(tl.trans(qg.to(sd)), do) - tl.dot(tl.trans(w), dd.to(sd))
    p1, m1 = _state(dh0_ptr, n, h, H, K, V, offs_k, offs_v)
    tl.store(p1, dh, mask=m1)


@triton.jit
def delta_seg_combine_kernel(
    p_ptr,
    s_ptr,
    h0_ptr,
    hin_ptr,
    ht_ptr,
    seq_s0,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_H0: tl.constexpr,
    STORE_FINAL: tl.constexpr,
    REVERSE: tl.constexpr,
    PREC: tl.constexpr,
):
    """Pass states across the segments of sequence ``n`` (head ``h``, one V tile), in order.
    Grid ``(cdiv(V, BV), N, H)``.

    A long sequence's scan runs as segments of chunks (LASP-2's split, inside one GPU): each
    segment ``s`` of sequence n (``seq_s0[n] <= s < seq_s0[n + 1]``) has its transition product
    ``P_s`` (``p`` ``[NS, H, K, K]``, fp32) and its scan result from a zero state ``S_s``
    (``s`` ``[NS, H, K, V]``). Forward: ``h_in(s) = h``, then ``h = P_s h + S_s``, from
    ``h0[n]`` (or 0). REVERSE (the state adjoint, last segment first): ``dh_end(s) = dh``, then
    ``dh = P_s^T dh + S_s``, from ``ht[n]``'s adjoint. Stores each segment's entry value in
    ``hin`` ``[NS, H, K, V]`` (fp32) and the last value (``ht``, or ``dh0`` in reverse) if
    STORE_FINAL. Products in precision PREC.
    """
    pv, n, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_k = tl.arange(0, BK)
    offs_v = pv * BV + tl.arange(0, BV)
    s0 = tl.load(seq_s0 + n)
    s1 = tl.load(seq_s0 + n + 1)
    p0, m0 = _state(h0_ptr, n, h, H, K, V, offs_k, offs_v)
    if HAS_H0:
        st = tl.load(p0, mask=m0, other=0.0).to(tl.float32)
    else:
        st = tl.zeros([BK, BV], tl.float32)
    for i in range(s1 - s0):
        if REVERSE:
            sg = s1 - 1 - i
        else:
            sg = s0 + i
        ip, im = _state(hin_ptr, sg, h, H, K, V, offs_k, offs_v)
        tl.store(ip, st, mask=im)
        base = (sg.to(tl.int64) * H + h) * K * K
        km = (offs_k < K)[:, None] & (offs_k < K)[None, :]
        if REVERSE:  # P^T: element (i, j) = P[j, i]
            pp = p_ptr + base + offs_k[None, :] * K + offs_k[:, None]
        else:
            pp = p_ptr + base + offs_k[:, None] * K + offs_k[None, :]
        pm = tl.load(pp, mask=km, other=0.0)
        sp, _ = _state(s_ptr, sg, h, H, K, V, offs_k, offs_v)
        st = tl.dot(pm, st, input_precision=PREC) + tl.load(sp, mask=im, other=0.0)
    if STORE_FINAL:
        p1, m1 = _state(ht_ptr, n, h, H, K, V, offs_k, offs_v)
        tl.store(p1, st, mask=m1)
