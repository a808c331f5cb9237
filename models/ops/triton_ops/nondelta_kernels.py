"""Triton kernels for the non-delta recurrences (no decay, scalar decay, per-channel decay).

All tensors are flattened to one packed sequence of ``TT`` tokens (``[TT, H, D]``, contiguous),
and the work is cut into *groups* of whole chunks of one sequence (a row of the group table
gives its token range ``[bos, eos)``). A sequence is therefore processed like LASP-2 processes
it across GPUs: every group computes its local state contribution and decay in parallel
(:func:`local_state_kernel`), a short scan over groups per sequence composes them
(:func:`group_scan_kernel`), and every group then replays its chunks from its exact incoming
state (:func:`fwd_o_kernel`, and the backward kernels). Only one ``[K, V]`` state per group
reaches memory.

GATE: 0 none, 1 scalar log gate ``g`` ``[TT, H]`` (HEAD_G: one fixed log decay per head,
``g`` ``[H]``, the in-chunk decays formed from positions), 2 per-channel log gate ``gk``
``[TT, H, K]``.
Gates are summed within each chunk in fp32 (``b`` = inclusive in-chunk cumulative log gate), and
every exponent is either ``b_i - b_j`` with ``i >= j``, ``b`` or ``b_last - b``: all <= 0.
For GATE 2, ``g_ptr`` is the fp32 in-chunk cumulative gate and the intra-chunk scores and their
gradients come from :mod:`.gla_kernels`. Backward with gates keeps one extra state per chunk
(``hc``, the state entering it) for the chunk-local gate gradient; GATE 1 also passes the
per-token ``q_t . dq_t`` (per K-block, from the fp32 accumulator) from the dq to the dk kernel,
so dq itself is stored in q's dtype, and forms its gate gradient as a sum over the token pairs
each gate lies between (:func:`bwd_dk_kernel`); all of that only when the gate needs a gradient
(``DG``; fixed per-head decays need none). Offsets are computed in int64.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "local_state_kernel",
    "group_scan_kernel",
    "fwd_o_kernel",
    "bwd_dq_kernel",
    "bwd_dk_kernel",
    "bwd_dv_kernel",
]


@triton.jit
def _rows(bos, eos, c, BT: tl.constexpr):
    """Chunk ``c`` of the group ``[bos, eos)``: its rows (int64), their mask, its last valid
    row (int64) and its first token."""
    t0 = bos + c * BT
    t = t0 + tl.arange(0, BT)
    last = tl.minimum(t0 + BT, eos) - 1
    return t.to(tl.int64), t < eos, last.to(tl.int64), t0


@triton.jit
def _load(ptr, t64, mt, h, H: tl.constexpr, D: tl.constexpr, offs, md):
    return tl.load(
        ptr + (t64[:, None] * H + h) * D + offs[None, :], mask=mt[:, None] & md[None, :], other=0.0
    )


@triton.jit
def _store(ptr, val, t64, mt, h, H: tl.constexpr, D: tl.constexpr, offs, md):
    tl.store(
        ptr + (t64[:, None] * H + h) * D + offs[None, :],
        val.to(ptr.dtype.element_ty),
        mask=mt[:, None] & md[None, :],
    )


@triton.jit
def _state_ptrs(ptr, idx, h, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, offs_k, offs_v):
    base = (idx.to(tl.int64) * H + h) * K
    return ptr + (base + offs_k[:, None]) * V + offs_v[None, :]


@triton.jit
def _store_state(
    ptr, h, idx, hh, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, offs_k, offs_v, mk, mv
):
    """Store the ``[BK, BV]`` tile ``h`` of state ``idx``, head ``hh`` (``[*, H, K, V]``)."""
    tl.store(
        _state_ptrs(ptr, idx, hh, H, K, V, offs_k, offs_v),
        h.to(ptr.dtype.element_ty),
        mask=mk[:, None] & mv[None, :],
    )


@triton.jit
def local_state_kernel(
    x_ptr,
    y_ptr,
    g_ptr,
    m_ptr,
    dl_ptr,
    g_bos,
    g_eos,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GATE: tl.constexpr,
    HEAD_G: tl.constexpr,
    REVERSE: tl.constexpr,
):
    """Group-local state from a zero start. Forward: ``M = sum_c decay * (k e^(bl-b))^T v``.
    REVERSE (adjoint): ``dM = scale * sum_c decay * (q e^b)^T do``, chunks last to first.
    x = k or q ``[TT, H, K]``, y = v or do ``[TT, H, V]``; writes M ``[G, H, K, V]`` and the
    group's summed log gate ``[G, H]`` / ``[G, H, K]``."""
    pid_kv, pid_g, pid_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NV: tl.constexpr = triton.cdiv(V, BV)
    offs_k = (pid_kv // NV) * BK + tl.arange(0, BK)
    offs_v = (pid_kv % NV) * BV + tl.arange(0, BV)
    mk, mv = offs_k < K, offs_v < V
    bos, eos = tl.load(g_bos + pid_g), tl.load(g_eos + pid_g)
    n = tl.cdiv(eos - bos, BT)
    acc = tl.zeros([BK, BV], tl.float32)
    if GATE == 2:
        dl = tl.zeros([BK], tl.float32)
    else:
        dl = tl.zeros([1], tl.float32)
    for i in range(n):
        c = n - 1 - i if REVERSE else i
        t64, mt, tl64, t0 = _rows(bos, eos, c, BT)
        x = _load(x_ptr, t64, mt, pid_h, H, K, offs_k, mk).to(tl.float32)
        y = _load(y_ptr, t64, mt, pid_h, H, V, offs_v, mv)
        if GATE == 1:
            b, bl = _gates(g_ptr, t64, mt, tl64, t0, pid_h, H, K, offs_k, mk, GATE, HEAD_G, BT)
            if REVERSE:
                x = x * tl.exp(b)[:, None]
            else:
                x = x * tl.exp(bl - b)[:, None]
            acc = acc * tl.exp(bl)
            dl += bl
        elif GATE == 2:
            b, bl = _gates(g_ptr, t64, mt, tl64, t0, pid_h, H, K, offs_k, mk, GATE, HEAD_G, BT)
            if REVERSE:
                x = x * tl.exp(b)
            else:
                x = x * tl.exp(bl[None, :] - b)
            acc = acc * tl.exp(bl)[:, None]
            dl += bl
        acc += tl.dot(tl.trans(x.to(y.dtype)), y)
    if REVERSE:
        acc = acc * scale
    _store_state(m_ptr, acc, pid_g, pid_h, H, K, V, offs_k, offs_v, mk, mv)
    if GATE == 2:  # noqa: SIM102 - constexpr branch around a runtime one
        if pid_kv % NV == 0:
            tl.store(dl_ptr + (pid_g.to(tl.int64) * H + pid_h) * K + offs_k, dl, mask=mk)
    elif GATE == 1:  # noqa: SIM102
        if pid_kv == 0:
            tl.store(dl_ptr + pid_g.to(tl.int64) * H + pid_h + tl.arange(0, 1), dl)


@triton.jit
def group_scan_kernel(
    m_ptr,
    dl_ptr,
    h0_ptr,
    hs_ptr,
    hn_ptr,
    seq_g0,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GATE: tl.constexpr,
    REVERSE: tl.constexpr,
    HAS_H0: tl.constexpr,
    STORE_FINAL: tl.constexpr,
):
    """Scan over one sequence's groups: ``hs[g] = h; h = exp(dl[g]) h + M[g]`` (REVERSE: from
    the last group, hs then holds the adjoint at each group's end). h starts at h0[n] (or dht,
    or zeros); the end value goes to hn[n] (the final state, or dh0)."""
    pid_kv, n, pid_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NV: tl.constexpr = triton.cdiv(V, BV)
    offs_k = (pid_kv // NV) * BK + tl.arange(0, BK)
    offs_v = (pid_kv % NV) * BV + tl.arange(0, BV)
    msk = (offs_k < K)[:, None] & (offs_v < V)[None, :]
    g0, g1 = tl.load(seq_g0 + n), tl.load(seq_g0 + n + 1)
    if HAS_H0:
        h = tl.load(_state_ptrs(h0_ptr, n, pid_h, H, K, V, offs_k, offs_v), mask=msk, other=0.0).to(
            tl.float32
        )
    else:
        h = tl.zeros([BK, BV], tl.float32)
    for i in range(g1 - g0):
        g = g1 - 1 - i if REVERSE else g0 + i
        tl.store(_state_ptrs(hs_ptr, g, pid_h, H, K, V, offs_k, offs_v), h, mask=msk)
        m = tl.load(_state_ptrs(m_ptr, g, pid_h, H, K, V, offs_k, offs_v), mask=msk, other=0.0)
        if GATE == 1:
            h = h * tl.exp(tl.load(dl_ptr + g.to(tl.int64) * H + pid_h))
        elif GATE == 2:
            d = tl.load(
                dl_ptr + (g.to(tl.int64) * H + pid_h) * K + offs_k, mask=offs_k < K, other=0.0
            )
            h = h * tl.exp(d)[:, None]
        h = h + m
    if STORE_FINAL:
        tl.store(_state_ptrs(hn_ptr, n, pid_h, H, K, V, offs_k, offs_v), h, mask=msk)


@triton.jit
def _gates(
    g_ptr,
    t64,
    mt,
    tl64,
    t0,
    h,
    H: tl.constexpr,
    K: tl.constexpr,
    offs_k,
    mk,
    GATE: tl.constexpr,
    HEAD_G: tl.constexpr,
    BT: tl.constexpr,
):
    """In-chunk inclusive cumulative log gate b and its chunk total bl (chunk rows ``t64`` from
    token ``t0``, last valid row ``tl64``; rows past it get ``b = bl``, as a zero gate would
    give them). GATE 1: from the raw scalar gate ``[TT, H]``, or with HEAD_G from one log decay
    per head (``g_ptr`` ``[H]``: ``b = g * position``, no load per token, no sums); GATE 2:
    g_ptr holds the fp32 in-chunk cumulative gate (chunk_cumsum_kernel)."""
    if GATE == 2:
        b = _load(g_ptr, t64, mt, h, H, K, offs_k, mk)
        bl = tl.load(g_ptr + (tl64 * H + h) * K + offs_k, mask=mk, other=0.0)
        return b, bl
    elif HEAD_G:
        # positions from an arange, not from t64: the compiler forms them in whatever layout
        # each use needs (derived from t64 they went through layout conversions: f+b 2.76
        # against 2.62 ms at 8K x 8 on an H100)
        gam = tl.load(g_ptr + h).to(tl.float32)
        nval = (tl64 - t0 + 1).to(tl.int32)
        pos = tl.minimum(tl.arange(0, BT) + 1, nval).to(tl.float32)
        return gam * pos, gam * nval.to(tl.float32)
    else:
        gg = tl.load(g_ptr + t64 * H + h, mask=mt, other=0.0).to(tl.float32)
        return tl.cumsum(gg, 0), tl.sum(gg, 0)


@triton.jit
def fwd_o_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    a_ptr,
    hs_ptr,
    o_ptr,
    g_bos,
    g_eos,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GATE: tl.constexpr,
    HEAD_G: tl.constexpr,
):
    """``o = scale (q e^b h + A v)`` chunk by chunk from the group's incoming state (BK >= K)."""
    pid_v, pid_g, pid_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_k = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    offs_t = tl.arange(0, BT)
    mk, mv = offs_k < K, offs_v < V
    causal = offs_t[:, None] >= offs_t[None, :]
    bos, eos = tl.load(g_bos + pid_g), tl.load(g_eos + pid_g)
    h = tl.load(
        _state_ptrs(hs_ptr, pid_g, pid_h, H, K, V, offs_k, offs_v),
        mask=mk[:, None] & mv[None, :],
        other=0.0,
    )
    for c in range(tl.cdiv(eos - bos, BT)):
        t64, mt, tl64, t0 = _rows(bos, eos, c, BT)
        q = _load(q_ptr, t64, mt, pid_h, H, K, offs_k, mk)
        k = _load(k_ptr, t64, mt, pid_h, H, K, offs_k, mk)
        v = _load(v_ptr, t64, mt, pid_h, H, V, offs_v, mv)
        dt = v.dtype
        if GATE == 0:
            a = tl.where(causal, tl.dot(q, tl.trans(k)), 0.0)
            o = tl.dot(q, h.to(dt))
            kg, vg = k, v
        else:
            b, bl = _gates(g_ptr, t64, mt, tl64, t0, pid_h, H, K, offs_k, mk, GATE, HEAD_G, BT)
            if GATE == 1:
                d = tl.exp(tl.where(causal, b[:, None] - b[None, :], float("-inf")))
                a = tl.dot(q, tl.trans(k)) * d
                # a scalar gate scales whole rows: apply it to the product, not to q
                o = tl.dot(q, h.to(dt)) * tl.exp(b)[:, None]
                # the decay to the chunk end scales rows of k^T v: put it on v's [BT, BV] tile,
                # half of k's [BT, K] (the product then takes k from shared memory unchanged)
                kg, vg = k, (v * tl.exp(bl - b)[:, None]).to(dt)
                h = h * tl.exp(bl)
            else:
                a = tl.load(
                    a_ptr + (t64[:, None] * H + pid_h) * BT + offs_t[None, :],
                    mask=mt[:, None] & causal,
                    other=0.0,
                )
                o = tl.dot((q * tl.exp(b)).to(dt), h.to(dt))
                kg, vg = (k * tl.exp(bl[None, :] - b)).to(dt), v
                h = h * tl.exp(bl)[:, None]
        o += tl.dot(a.to(dt), v)
        _store(o_ptr, o * scale, t64, mt, pid_h, H, V, offs_v, mv)
        h += tl.dot(tl.trans(kg), vg)


@triton.jit
def bwd_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    do_ptr,
    dqi_ptr,
    hs_ptr,
    dq_ptr,
    hc_ptr,
    sq_ptr,
    g_bos,
    g_eos,
    g_c0,
    scale,
    TT,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GATE: tl.constexpr,
    HEAD_G: tl.constexpr,
    EXACT_PAIRS: tl.constexpr,
    DG: tl.constexpr,
):
    """``dq = scale (e^b do h^T + (do v^T * D) k)``, forward over chunks (BV >= V). With gates,
    also stores one state per chunk ``hc`` ``[NC, H, K, V]`` for the gate gradient (the state
    entering the chunk); GATE 1 also stores ``sq_t = q_t . dq_t``
    over this K-block, ``[NK, H, TT]`` fp32 (tokens contiguous), from the fp32 accumulator, of
    all of dq or (EXACT_PAIRS) only of its part through the entering state: dq itself is then
    stored rounded to dq_ptr's dtype. Without DG (GATE 1 only: the gate needs no gradient, as
    for fixed per-head decays) neither ``hc`` nor ``sq`` is written."""
    pid_k, pid_g, pid_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_k = pid_k * BK + tl.arange(0, BK)
    offs_v = tl.arange(0, BV)
    offs_t = tl.arange(0, BT)
    mk, mv = offs_k < K, offs_v < V
    causal = offs_t[:, None] >= offs_t[None, :]
    bos, eos = tl.load(g_bos + pid_g), tl.load(g_eos + pid_g)
    c0 = tl.load(g_c0 + pid_g)
    h = tl.load(
        _state_ptrs(hs_ptr, pid_g, pid_h, H, K, V, offs_k, offs_v),
        mask=mk[:, None] & mv[None, :],
        other=0.0,
    )
    n = tl.cdiv(eos - bos, BT)
    if DG:
        _store_state(hc_ptr, h, c0, pid_h, H, K, V, offs_k, offs_v, mk, mv)
    for c in range(n):
        t64, mt, tl64, t0 = _rows(bos, eos, c, BT)
        k = _load(k_ptr, t64, mt, pid_h, H, K, offs_k, mk)
        v = _load(v_ptr, t64, mt, pid_h, H, V, offs_v, mv)
        do = _load(do_ptr, t64, mt, pid_h, H, V, offs_v, mv)
        dt = v.dtype
        dq = tl.dot(do, tl.trans(h.to(dt)))
        if GATE == 0:
            da = tl.where(causal, tl.dot(do, tl.trans(v)), 0.0)
            dq += tl.dot(da.to(dt), k)
            kg = k
        else:
            b, bl = _gates(g_ptr, t64, mt, tl64, t0, pid_h, H, K, offs_k, mk, GATE, HEAD_G, BT)
            if GATE == 1:
                sq_ptrs = sq_ptr + (pid_k.to(tl.int64) * H + pid_h) * TT + t64
                if DG and EXACT_PAIRS:  # q . (dq's part through the entering state) only: the dk
                    # kernel forms the in-chunk pairs
                    q = _load(q_ptr, t64, mt, pid_h, H, K, offs_k, mk).to(tl.float32)
                    tl.store(sq_ptrs, tl.sum(q * dq, 1) * tl.exp(b) * scale, mask=mt)
                d = tl.exp(tl.where(causal, b[:, None] - b[None, :], float("-inf")))
                # da is rounded exactly as the dk kernel rounds its transpose (scale inside):
                # the split pairs cancel term by term only then
                da = tl.dot(do, tl.trans(v)) * (d * scale)
                dq = dq * (tl.exp(b) * scale)[:, None] + tl.dot(da.to(dt), k)
                if DG and not EXACT_PAIRS:  # q . all of dq
                    q = _load(q_ptr, t64, mt, pid_h, H, K, offs_k, mk).to(tl.float32)
                    tl.store(sq_ptrs, tl.sum(q * dq, 1), mask=mt)
                kg = (k * tl.exp(bl - b)[:, None]).to(dt)
                h = h * tl.exp(bl)
            else:
                dq = dq * tl.exp(b)
                kg = (k * tl.exp(bl[None, :] - b)).to(dt)
                h = h * tl.exp(bl)[:, None]
        if GATE != 1:
            dq = dq * scale
        if GATE == 2:
            dq += _load(dqi_ptr, t64, mt, pid_h, H, K, offs_k, mk)
        _store(dq_ptr, dq, t64, mt, pid_h, H, K, offs_k, mk)
        h += tl.dot(tl.trans(kg), v)
        # with gates, keep the state entering each chunk: the next chunk's here, the first
        # chunk's before the loop
        if DG:  # noqa: SIM102 - constexpr branch around a runtime one
            if c + 1 < n:
                _store_state(hc_ptr, h, c0 + c + 1, pid_h, H, K, V, offs_k, offs_v, mk, mv)


@triton.jit
def bwd_dk_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    do_ptr,
    dki_ptr,
    he_ptr,
    dq_ptr,
    hc_ptr,
    sq_ptr,
    dk_ptr,
    dg_ptr,
    dqo_ptr,
    g_bos,
    g_eos,
    g_c0,
    scale,
    TT,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GATE: tl.constexpr,
    HEAD_G: tl.constexpr,
    EXACT_PAIRS: tl.constexpr,
    DG: tl.constexpr,
):
    """``dk = e^(bl-b) v dH^T + scale (v do^T * D^T) q``, backward over chunks from the adjoint
    at the group's end (BV >= V).

    With gates it also writes the gate gradient, chunk-locally.

    GATE 2 (``[TT, H, K]``, from the fp32 dq ``[TT, H, K]``): for token s of chunk c,
    ``dg_s = sum_{t >= s in c} (q_t dq_t - k_t dk_t) + e^bl sum_v (H_(c-1) * dH_c)
    + sum_{t in c} k_t dk'_t``, per channel, with H_(c-1) the state entering the chunk (``hc``),
    dH_c the adjoint leaving it and dk' the part of dk through dH_c. The last two terms are
    ``sum_v (H_c * dH_c)`` (the leaving state against its adjoint) split in two: the chunk's own
    ``k dk'`` then comes from the same fp32 values as in the reverse sum and cancels there to
    fp32 rounding, where through the bf16-rounded ``H_c`` it did not (dgk 1.2e-2 in bf16 at
    gates 64x the default, 2.6e-3 now). Cutting the reverse sum at every chunk keeps its error
    local. It also stores the fp32 dq it reads in dqo's dtype (and dg in dg_ptr's: the gate's
    dtype), so no conversion pass follows.

    GATE 1 (this K-block's partial sum, ``[NK, TT, H]``, with the dq kernel's ``sq`` of the same
    K-block, ``[NK, H, TT]``): ``dg_s`` is the sum over every pair (source j < s, sink i >= s)
    that s's decay lies between, i.e. ``e^(B_i - B_j) (q_i . k_j)(do_i . v_j) scale``, plus the
    pairs with the entering state as source or the final-state gradient as sink. By where j and
    i lie relative to chunk c, each part is formed without cancelling terms:

    - before c -> after c: ``e^bl sum (H_(c-1) * dH_c)``, the entering state (``hc``) against
      the leaving adjoint, one value per chunk;
    - before c -> i >= s in c: ``sum_{i >= s} q_i . dq'_i``, dq' the part of dq through the
      entering state (``sq``);
    - j < s in c -> after c: ``sum_{j < s} k_j . dk'_j``, dk' the part of dk through the
      leaving adjoint;
    - both in c: with ``m[j, i]`` the pair terms, the pairs with i >= s minus those with j >= s.
      EXACT_PAIRS forms ``m`` once here (fp32 ``v do^T * D`` times ``k q^T`` of this K-block)
      and takes its column minus row sums; otherwise they come as ``q . dq`` (in ``sq``) minus
      ``k . dk`` of the in-chunk parts, which agree term by term only when both products see the
      same operands (exact for 16-bit inputs; fp32 inputs are tf32-rounded differently in the
      two kernels, and the large diagonal terms then fail to cancel under strong gates).

    The old form ``sum_{t >= s} (q_t dq_t - k_t dk_t) + sum (H_c * dH_c)`` is the same sum, but
    with the chunk's own ``k . dk'`` once through the bf16-rounded ``H_c`` and once through the
    bf16-rounded ``dH`` of the product, cancelling: 1.2e-2 relative error on dg in bf16 (6.6e-3
    in fp32) at gates of about -4 per token, against 2.3e-3 (1.5e-3) now."""
    pid_k, pid_g, pid_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_k = pid_k * BK + tl.arange(0, BK)
    offs_v = tl.arange(0, BV)
    offs_t = tl.arange(0, BT)
    mk, mv = offs_k < K, offs_v < V
    anti = offs_t[:, None] <= offs_t[None, :]  # rows j, cols i >= j
    bos, eos = tl.load(g_bos + pid_g), tl.load(g_eos + pid_g)
    c0 = tl.load(g_c0 + pid_g)
    dh = tl.load(
        _state_ptrs(he_ptr, pid_g, pid_h, H, K, V, offs_k, offs_v),
        mask=mk[:, None] & mv[None, :],
        other=0.0,
    )
    n = tl.cdiv(eos - bos, BT)
    for i in range(n):
        c = n - 1 - i
        t64, mt, tl64, t0 = _rows(bos, eos, c, BT)
        if DG:
            # The state entering the chunk meets the adjoint of the leaving state first and is
            # reduced at once, so its tile (kept in its storage dtype) is dead before the
            # chunk's other tiles are live.
            hc = tl.load(
                _state_ptrs(hc_ptr, c0 + c, pid_h, H, K, V, offs_k, offs_v),
                mask=mk[:, None] & mv[None, :],
                other=0.0,
            )
            # the pairs from before the chunk to after it, without the chunk's decay (applied
            # below): [BK] for GATE 2, summed over K-block rows for GATE 1
            tail = tl.sum(hc.to(tl.float32) * dh, 1)
            if GATE == 1:
                tail = tl.sum(tail, 0)
        q = _load(q_ptr, t64, mt, pid_h, H, K, offs_k, mk)
        v = _load(v_ptr, t64, mt, pid_h, H, V, offs_v, mv)
        do = _load(do_ptr, t64, mt, pid_h, H, V, offs_v, mv)
        dt = v.dtype
        dk = tl.dot(v, tl.trans(dh.to(dt)))
        if GATE == 0:
            dat = tl.where(anti, tl.dot(v, tl.trans(do)), 0.0)
            dk += scale * tl.dot(dat.to(dt), q)
            qg = q
        else:
            b, bl = _gates(g_ptr, t64, mt, tl64, t0, pid_h, H, K, offs_k, mk, GATE, HEAD_G, BT)
            if GATE == 1:
                # the gate gradient as a sum over straddling pairs (see the docstring)
                dk = dk * tl.exp(bl - b)[:, None]  # the part through the leaving state
                if DG:
                    k = _load(k_ptr, t64, mt, pid_h, H, K, offs_k, mk)
                    kx = tl.sum(k.to(tl.float32) * dk, 1)
                    sq = tl.load(
                        sq_ptr + (pid_k.to(tl.int64) * H + pid_h) * TT + t64, mask=mt, other=0.0
                    )
                d = tl.exp(tl.where(anti, b[None, :] - b[:, None], float("-inf")))
                dat = tl.dot(v, tl.trans(do)) * (d * scale)  # [j, i]: (v_j . do_i) D_ij
                # pairs inside the chunk, m[j, i] = dat * (k_j . q_i) (this K-block): those
                # with i >= s minus those with j >= s are the ones with j < s <= i
                if DG and EXACT_PAIRS:
                    m = dat * tl.dot(k, tl.trans(q))
                    inner = tl.sum(m, 0) - tl.sum(m, 1)
                dk += tl.dot(dat.to(dt), q)
                if DG:
                    if not EXACT_PAIRS:  # sq: sum_j m[j, i]; k . dk's own part: sum_i m[j, i]
                        inner = kx - tl.sum(k.to(tl.float32) * dk, 1)
                    dg = tl.cumsum(sq + inner, 0, reverse=True) + (tl.cumsum(kx, 0) - kx)
                    dg += tail * tl.exp(bl)
                    tl.store(dg_ptr + (pid_k.to(tl.int64) * TT + t64) * H + pid_h, dg, mask=mt)
                qg = (q * tl.exp(b)[:, None]).to(dt)
                dh = dh * tl.exp(bl)
            else:
                dk = dk * tl.exp(bl[None, :] - b)  # the part through the leaving state
                # the chunk's sum of k dk' (per channel) closes the tail (see the docstring)
                k = _load(k_ptr, t64, mt, pid_h, H, K, offs_k, mk).to(tl.float32)
                tail = tail * tl.exp(bl) + tl.sum(k * dk, 0)
                dk += _load(dki_ptr, t64, mt, pid_h, H, K, offs_k, mk)
                qg = (q * tl.exp(b)).to(dt)
                dh = dh * tl.exp(bl)[:, None]
                dq = _load(dq_ptr, t64, mt, pid_h, H, K, offs_k, mk).to(tl.float32)
                _store(dqo_ptr, dq, t64, mt, pid_h, H, K, offs_k, mk)  # dq in q's dtype
                # k again rather than kept live from above (sm_90: 452 against 668 B spilled)
                k = _load(k_ptr, t64, mt, pid_h, H, K, offs_k, mk).to(tl.float32)
                db = q.to(tl.float32) * dq - k * dk
                dg = tl.sum(db, 0)[None, :] - tl.cumsum(db, 0) + db + tail[None, :]
                _store(dg_ptr, dg, t64, mt, pid_h, H, K, offs_k, mk)
        _store(dk_ptr, dk, t64, mt, pid_h, H, K, offs_k, mk)
        dh += scale * tl.dot(tl.trans(qg), do)


@triton.jit
def bwd_dv_kernel(
    q_ptr,
    k_ptr,
    g_ptr,
    do_ptr,
    a_ptr,
    he_ptr,
    dv_ptr,
    g_bos,
    g_eos,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GATE: tl.constexpr,
    HEAD_G: tl.constexpr,
):
    """``dv = scale A^T do + (k e^(bl-b)) dH``, backward over chunks (BK >= K)."""
    pid_v, pid_g, pid_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_k = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    offs_t = tl.arange(0, BT)
    mk, mv = offs_k < K, offs_v < V
    anti = offs_t[:, None] <= offs_t[None, :]
    bos, eos = tl.load(g_bos + pid_g), tl.load(g_eos + pid_g)
    dh = tl.load(
        _state_ptrs(he_ptr, pid_g, pid_h, H, K, V, offs_k, offs_v),
        mask=mk[:, None] & mv[None, :],
        other=0.0,
    )
    n = tl.cdiv(eos - bos, BT)
    for i in range(n):
        c = n - 1 - i
        t64, mt, tl64, t0 = _rows(bos, eos, c, BT)
        q = _load(q_ptr, t64, mt, pid_h, H, K, offs_k, mk)
        k = _load(k_ptr, t64, mt, pid_h, H, K, offs_k, mk)
        do = _load(do_ptr, t64, mt, pid_h, H, V, offs_v, mv)
        dt = do.dtype
        if GATE == 0:
            at = tl.where(anti, tl.dot(k, tl.trans(q)), 0.0)
            kg, qg, dog = k, q, do
        else:
            b, bl = _gates(g_ptr, t64, mt, tl64, t0, pid_h, H, K, offs_k, mk, GATE, HEAD_G, BT)
            if GATE == 1:
                d = tl.exp(tl.where(anti, b[None, :] - b[:, None], float("-inf")))
                at = tl.dot(k, tl.trans(q)) * d
                kg = k  # its decay to the chunk end scales whole rows of dv: applied below
                # q's decay from the chunk start scales rows of q^T do: put it on do's
                # [BT, BV] tile, half of q's [BT, K]
                qg, dog = q, (do * tl.exp(b)[:, None]).to(dt)
            else:
                at = tl.trans(
                    tl.load(
                        a_ptr + (t64[:, None] * H + pid_h) * BT + offs_t[None, :],
                        mask=mt[:, None] & (offs_t[:, None] >= offs_t[None, :]),
                        other=0.0,
                    )
                )
                kg = (k * tl.exp(bl[None, :] - b)).to(dt)
                qg, dog = (q * tl.exp(b)).to(dt), do
        # dh is the adjoint of the state at this chunk's end: use it, then carry it back.
        kdh = tl.dot(kg, dh.to(dt))
        if GATE == 1:
            kdh = kdh * tl.exp(bl - b)[:, None]
        dv = scale * tl.dot(at.to(dt), do) + kdh
        if GATE == 1:
            dh = dh * tl.exp(bl)
        elif GATE == 2:
            dh = dh * tl.exp(bl)[:, None]
        _store(dv_ptr, dv, t64, mt, pid_h, H, V, offs_v, mv)
        dh += scale * tl.dot(tl.trans(qg), dog)
