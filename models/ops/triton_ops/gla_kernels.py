"""Triton kernels for the per-channel-gate (GLA) intra-chunk terms, chunk 64.

``A_ij = sum_k q_ik k_jk exp(b_ik - b_jk)`` (j <= i) with b the in-chunk cumulative log gate,
and its gradients (intra-chunk parts of dq and dk). Two versions, chosen by
``LINSCALE_GLA_INTRA``: v3 (default) factors a whole chunk through one reference gate when the
chunk's gate range allows it and otherwise runs v2's computation; v2 works in 16-row blocks.
Every factorisation keeps each exponential within ``exp(+-DIAG_RANGE)`` (or <= 1), and every
exponent is clamped so that padded rows (loaded as zeros) can never produce inf * 0.
"""

from __future__ import annotations

import triton
import triton.language as tl

from models.ops.triton_ops.nondelta_kernels import _rows

__all__ = [
    "chunk_cumsum_kernel",
    "gla_intra_fwd_v2_kernel",
    "gla_intra_bwd_v2_kernel",
    "gla_intra_fwd_v3_kernel",
    "gla_intra_bwd_v3_kernel",
]


@triton.jit
def chunk_cumsum_kernel(
    g_ptr, b_ptr, g_bos, g_eos, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr
):
    """b = in-chunk inclusive cumulative sum of the log gate ``[TT, H, K]``, fp32."""
    pid_k, pid_g, pid_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_k = pid_k * BK + tl.arange(0, BK)
    mk = offs_k < K
    bos, eos = tl.load(g_bos + pid_g), tl.load(g_eos + pid_g)
    for c in range(tl.cdiv(eos - bos, BT)):
        t = bos + c * BT + tl.arange(0, BT)
        mt = t < eos
        ptrs = (t.to(tl.int64)[:, None] * H + pid_h) * K + offs_k[None, :]
        m = mt[:, None] & mk[None, :]
        g = tl.load(g_ptr + ptrs, mask=m, other=0.0).to(tl.float32)
        tl.store(b_ptr + ptrs, tl.cumsum(g, 0), mask=m)


# --- v2: 16-row blocks ---------------------------------------------------------------------------
# One program per (16-row block, chunk, head). Off-diagonal 16-blocks (I > J) factor through
# ``r_J`` = b at the last row of block J: ``exp(b_i - r_J)`` and ``exp(r_J - b_j)`` both have
# exponents <= 0, so they are tensor-core products in the input dtype. A diagonal block factors through the gate of its own first row r0:
# ``exp(b_i - b_j) = exp(b_i - r0) exp(r0 - b_j)``, the first factor <= 1, the second >= 1 and
# at most ``exp(DIAG_RANGE)`` when the block's gate range ``max(r0 - b_j)`` is within DIAG_RANGE
# (checked per program), so an fp32 product of two [16, K] tiles gives the block without
# overflow or underflow. A block whose gates fall further than that (a decay below
# exp(-DIAG_RANGE) within 16 tokens) takes a 16-step loop over single rows with one exponent
# per (i, j, k) instead.


@triton.jit
def _row(
    ptr,
    bos,
    eos,
    c,
    I: tl.constexpr,
    j,
    h,
    H: tl.constexpr,
    D: tl.constexpr,
    offs_d,
    md,
    BT: tl.constexpr,
    BC: tl.constexpr,
):
    # rows past the end are clamped to a real row: every use multiplies them by a zero
    t = tl.minimum(bos + c * BT + I * BC + j, eos - 1)
    return tl.load(ptr + (t.to(tl.int64) * H + h) * D + offs_d, mask=md, other=0.0)


@triton.jit
def gla_intra_fwd_v2_kernel(
    q_ptr,
    k_ptr,
    b_ptr,
    a_ptr,
    g_bos,
    g_eos,
    H: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    DIAG_RANGE: tl.constexpr,
):
    """Row block ``I`` of the unscaled scores A ``[TT, H, BT]``, stored in A's dtype (row t,
    column j of t's chunk; j > i unwritten)."""
    I, pid_g, pid_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, eos = tl.load(g_bos + pid_g), tl.load(g_eos + pid_g)
    _fwd_row_block(q_ptr, k_ptr, b_ptr, a_ptr, bos, eos, I, pid_h, H, K, BT, BC, BK, DIAG_RANGE)


@triton.jit
def _fwd_row_block(
    q_ptr,
    k_ptr,
    b_ptr,
    a_ptr,
    bos,
    eos,
    I,
    pid_h,
    H: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    DIAG_RANGE: tl.constexpr,
):
    """Rows ``[I BC, (I + 1) BC)`` of the chunk ``[bos, eos)``'s scores A."""
    offs_c = tl.arange(0, BC)
    offs_k = tl.arange(0, BK)
    mk = offs_k < K
    ti = bos + I * BC + offs_c
    mi = ti < eos
    ti64 = ti.to(tl.int64)
    ptr_i = (ti64[:, None] * H + pid_h) * K + offs_k[None, :]
    qi = tl.load(q_ptr + ptr_i, mask=mi[:, None] & mk[None, :], other=0.0)
    bi = tl.load(b_ptr + ptr_i, mask=mi[:, None] & mk[None, :], other=0.0)
    dt = qi.dtype
    for J in range(I):
        tj = bos + J * BC + offs_c
        mj = tj < eos
        ptr_j = (tj.to(tl.int64)[:, None] * H + pid_h) * K + offs_k[None, :]
        kj = tl.load(k_ptr + ptr_j, mask=mj[:, None] & mk[None, :], other=0.0)
        bj = tl.load(b_ptr + ptr_j, mask=mj[:, None] & mk[None, :], other=0.0)
        r = _row(b_ptr, bos, eos, 0, 0, J * BC + BC - 1, pid_h, H, K, offs_k, mk, BT, BC)
        qg = (qi.to(tl.float32) * tl.exp(tl.minimum(bi - r[None, :], 0.0))).to(dt)
        kg = (kj.to(tl.float32) * tl.exp(tl.minimum(r[None, :] - bj, 0.0))).to(dt)
        a = tl.dot(qg, tl.trans(kg))
        tl.store(
            a_ptr + (ti64[:, None] * H + pid_h) * BT + J * BC + offs_c[None, :], a, mask=mi[:, None]
        )
    qf = qi.to(tl.float32)
    r0 = _row(b_ptr, bos, eos, 0, 0, I * BC, pid_h, H, K, offs_k, mk, BT, BC)
    mik = mi[:, None] & mk[None, :]
    if tl.max(tl.where(mik, r0[None, :] - bi, 0.0)) <= DIAG_RANGE:
        ki = tl.load(k_ptr + ptr_i, mask=mik, other=0.0).to(tl.float32)
        qg = qf * tl.exp(tl.minimum(bi - r0[None, :], 0.0))
        kg = ki * tl.exp(tl.minimum(r0[None, :] - bi, DIAG_RANGE))
        causal = offs_c[:, None] >= offs_c[None, :]
        a = tl.where(causal, tl.dot(qg, tl.trans(kg), input_precision="ieee"), 0.0)
    else:
        a = tl.zeros([BC, BC], tl.float32)
        for j in range(BC):
            kr = _row(k_ptr, bos, eos, 0, 0, I * BC + j, pid_h, H, K, offs_k, mk, BT, BC)
            br = _row(b_ptr, bos, eos, 0, 0, I * BC + j, pid_h, H, K, offs_k, mk, BT, BC)
            e = tl.exp(tl.minimum(bi - br[None, :], 0.0))
            col = tl.sum(qf * kr.to(tl.float32)[None, :] * e, 1)
            a = tl.where((offs_c[None, :] == j) & (offs_c[:, None] >= j), col[:, None], a)
    tl.store(
        a_ptr + (ti64[:, None] * H + pid_h) * BT + I * BC + offs_c[None, :], a, mask=mi[:, None]
    )


@triton.jit
def gla_intra_bwd_v2_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    b_ptr,
    do_ptr,
    dq_ptr,
    dk_ptr,
    g_bos,
    g_eos,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    DIAG_RANGE: tl.constexpr,
):
    """Block X of the intra-chunk dq (rows X) and dk (rows X), fp32 ``[TT, H, K]``."""
    X, pid_g, pid_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, eos = tl.load(g_bos + pid_g), tl.load(g_eos + pid_g)
    _bwd_row_block(
        q_ptr, k_ptr, v_ptr, b_ptr, do_ptr, dq_ptr, dk_ptr, bos, eos, X, scale, pid_h,
        H, K, V, BT, BC, BK, BV, DIAG_RANGE,
    )  # fmt: skip


@triton.jit
def _bwd_row_block(
    q_ptr,
    k_ptr,
    v_ptr,
    b_ptr,
    do_ptr,
    dq_ptr,
    dk_ptr,
    bos,
    eos,
    X,
    scale,
    pid_h,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    DIAG_RANGE: tl.constexpr,
):
    """Rows ``[X BC, (X + 1) BC)`` of the chunk ``[bos, eos)``'s intra-chunk dq and dk."""
    NB: tl.constexpr = BT // BC
    offs_c = tl.arange(0, BC)
    offs_k = tl.arange(0, BK)
    offs_v = tl.arange(0, BV)
    mk, mv = offs_k < K, offs_v < V
    causal = offs_c[:, None] >= offs_c[None, :]
    tx = bos + X * BC + offs_c
    mx = tx < eos
    tx64 = tx.to(tl.int64)
    kx_ptr = (tx64[:, None] * H + pid_h) * K + offs_k[None, :]
    vx_ptr = (tx64[:, None] * H + pid_h) * V + offs_v[None, :]
    mxk, mxv = mx[:, None] & mk[None, :], mx[:, None] & mv[None, :]
    bx = tl.load(b_ptr + kx_ptr, mask=mxk, other=0.0)
    dox = tl.load(do_ptr + vx_ptr, mask=mxv, other=0.0)
    vx = tl.load(v_ptr + vx_ptr, mask=mxv, other=0.0)
    dt = dox.dtype
    # dq of rows X: blocks J < X through the reference point r_J, then the diagonal block.
    dq = tl.zeros([BC, BK], tl.float32)
    for J in range(X):
        tj = bos + J * BC + offs_c
        mj = tj < eos
        tj64 = tj.to(tl.int64)
        kj = tl.load(
            k_ptr + (tj64[:, None] * H + pid_h) * K + offs_k[None, :],
            mask=mj[:, None] & mk[None, :],
            other=0.0,
        )
        bj = tl.load(
            b_ptr + (tj64[:, None] * H + pid_h) * K + offs_k[None, :],
            mask=mj[:, None] & mk[None, :],
            other=0.0,
        )
        vj = tl.load(
            v_ptr + (tj64[:, None] * H + pid_h) * V + offs_v[None, :],
            mask=mj[:, None] & mv[None, :],
            other=0.0,
        )
        r = _row(b_ptr, bos, eos, 0, 0, J * BC + BC - 1, pid_h, H, K, offs_k, mk, BT, BC)
        da = tl.dot(dox, tl.trans(vj)) * scale
        kg = (kj.to(tl.float32) * tl.exp(tl.minimum(r[None, :] - bj, 0.0))).to(dt)
        dq += tl.exp(tl.minimum(bx - r[None, :], 0.0)) * tl.dot(da.to(dt), kg)
    # The diagonal block X, for dq and dk at once (see the note above the v2 kernels).
    da = tl.where(causal, tl.dot(dox, tl.trans(vx)), 0.0) * scale  # [i, j] within block X
    r0 = _row(b_ptr, bos, eos, 0, 0, X * BC, pid_h, H, K, offs_k, mk, BT, BC)
    if tl.max(tl.where(mxk, r0[None, :] - bx, 0.0)) <= DIAG_RANGE:
        eq = tl.exp(tl.minimum(bx - r0[None, :], 0.0))
        ek = tl.exp(tl.minimum(r0[None, :] - bx, DIAG_RANGE))
        kx = tl.load(k_ptr + kx_ptr, mask=mxk, other=0.0).to(tl.float32)
        qx = tl.load(q_ptr + kx_ptr, mask=mxk, other=0.0).to(tl.float32)
        dq_d = eq * tl.dot(da, kx * ek, input_precision="ieee")
        dk_d = ek * tl.dot(tl.trans(da), qx * eq, input_precision="ieee")
    else:
        dq_d = tl.zeros([BC, BK], tl.float32)
        dk_d = tl.zeros([BC, BK], tl.float32)
        for j in range(BC):
            kr = _row(k_ptr, bos, eos, 0, 0, X * BC + j, pid_h, H, K, offs_k, mk, BT, BC)
            qr = _row(q_ptr, bos, eos, 0, 0, X * BC + j, pid_h, H, K, offs_k, mk, BT, BC)
            br = _row(b_ptr, bos, eos, 0, 0, X * BC + j, pid_h, H, K, offs_k, mk, BT, BC)
            dcol = tl.sum(tl.where(offs_c[None, :] == j, da, 0.0), 1)  # dA[:, j]
            drow = tl.sum(tl.where(offs_c[:, None] == j, da, 0.0), 0)  # dA[j, :]
            dq_d += (
                dcol[:, None]
                * kr.to(tl.float32)[None, :]
                * tl.exp(tl.minimum(bx - br[None, :], 0.0))
            )
            dk_d += (
                drow[:, None]
                * qr.to(tl.float32)[None, :]
                * tl.exp(tl.minimum(br[None, :] - bx, 0.0))
            )
    tl.store(dq_ptr + kx_ptr, dq + dq_d, mask=mxk)
    # dk of rows X: blocks I > X through r_X, then the diagonal block.
    r = _row(b_ptr, bos, eos, 0, 0, X * BC + BC - 1, pid_h, H, K, offs_k, mk, BT, BC)
    dk = tl.zeros([BC, BK], tl.float32)
    for I in range(X + 1, NB):
        ti = bos + I * BC + offs_c
        mi = ti < eos
        ti64 = ti.to(tl.int64)
        qi = tl.load(
            q_ptr + (ti64[:, None] * H + pid_h) * K + offs_k[None, :],
            mask=mi[:, None] & mk[None, :],
            other=0.0,
        )
        bi = tl.load(
            b_ptr + (ti64[:, None] * H + pid_h) * K + offs_k[None, :],
            mask=mi[:, None] & mk[None, :],
            other=0.0,
        )
        doi = tl.load(
            do_ptr + (ti64[:, None] * H + pid_h) * V + offs_v[None, :],
            mask=mi[:, None] & mv[None, :],
            other=0.0,
        )
        dat = tl.dot(vx, tl.trans(doi)) * scale  # [j in X, i in I]
        qg = (qi.to(tl.float32) * tl.exp(tl.minimum(bi - r[None, :], 0.0))).to(dt)
        dk += tl.dot(dat.to(dt), qg)
    dk = dk * tl.exp(tl.minimum(r[None, :] - bx, 0.0)) + dk_d
    tl.store(dk_ptr + kx_ptr, dk, mask=mxk)


# --- v3 (the default): whole chunks through one reference gate -----------------------------------
# One program per (chunk, head). With ``r = (b_first + b_last) / 2`` per channel, every exponent
# ``b_i - r`` and ``r - b_j`` of the chunk lies within half the chunk's gate range, so when that
# range is at most ``2 DIAG_RANGE`` the whole 64 x 64 score block is one product of
# ``q exp(b - r)`` and ``k exp(r - b)``, in K slices of BKS channels (tf32 tensor cores, fp32
# accumulation), and so are the intra-chunk dq and dk. A chunk whose gates fall further than
# that takes the v2 computation, row block by row block, in the same program.


@triton.jit
def _chunk_ref(b_ptr, bos, eos, h, H: tl.constexpr, K: tl.constexpr, offs_k, mk):
    """Per-channel reference gate (midpoint of the chunk's first and last row) and the largest
    per-channel gate range over the chunk (first row minus last)."""
    b0 = tl.load(b_ptr + (bos.to(tl.int64) * H + h) * K + offs_k, mask=mk, other=0.0)
    bl = tl.load(b_ptr + ((eos - 1).to(tl.int64) * H + h) * K + offs_k, mask=mk, other=0.0)
    return (b0 + bl) * 0.5, tl.max(b0 - bl, 0)


@triton.jit
def _chunk_factors(
    b_ptr,
    bos,
    eos,
    h,
    H: tl.constexpr,
    K: tl.constexpr,
    BK: tl.constexpr,
    BKS: tl.constexpr,
    DIAG_RANGE: tl.constexpr,
):
    """Whether every channel's gate range over the chunk is within ``2 DIAG_RANGE``."""
    rng = tl.zeros([1], tl.float32)
    for k0 in tl.static_range(0, BK, BKS):
        offs_s = k0 + tl.arange(0, BKS)
        _mid, rng_s = _chunk_ref(b_ptr, bos, eos, h, H, K, offs_s, offs_s < K)
        rng = tl.maximum(rng, rng_s)
    return tl.max(rng, 0) <= 2 * DIAG_RANGE


@triton.jit
def _slice_factors(
    q_ptr,
    k_ptr,
    b_ptr,
    bos,
    eos,
    t64,
    mt,
    h,
    k0,
    H: tl.constexpr,
    K: tl.constexpr,
    BKS: tl.constexpr,
    DIAG_RANGE: tl.constexpr,
):
    """One ``BKS``-channel slice of a chunk for the factored product: q, k (fp32) and their
    factors ``exp(b - r)``, ``exp(r - b)`` through the slice's mid gate r, ``[BT, BKS]`` each,
    plus the slice's pointer offsets and mask. Padded rows hold q = k = 0; the clamps keep
    their factors finite."""
    offs_s = k0 + tl.arange(0, BKS)
    ms = offs_s < K
    r, _rng = _chunk_ref(b_ptr, bos, eos, h, H, K, offs_s, ms)
    ptr = (t64[:, None] * H + h) * K + offs_s[None, :]
    m = mt[:, None] & ms[None, :]
    q = tl.load(q_ptr + ptr, mask=m, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + ptr, mask=m, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + ptr, mask=m, other=0.0)
    eq = tl.exp(tl.minimum(b - r[None, :], DIAG_RANGE))
    ek = tl.exp(tl.minimum(r[None, :] - b, DIAG_RANGE))
    return q, k, eq, ek, ptr, m


@triton.jit
def gla_intra_fwd_v3_kernel(
    q_ptr,
    k_ptr,
    b_ptr,
    a_ptr,
    g_bos,
    g_eos,
    H: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BKS: tl.constexpr,
    DIAG_RANGE: tl.constexpr,
):
    """Scores A of one chunk (see :func:`gla_intra_fwd_v2_kernel`; here j > i are written as
    zeros); the grid is (chunks, H)."""
    pid_g, pid_h = tl.program_id(0), tl.program_id(1)
    bos, eos = tl.load(g_bos + pid_g), tl.load(g_eos + pid_g)
    t64, mt, _last, _t0 = _rows(bos, eos, 0, BT)
    offs_t = tl.arange(0, BT)
    if _chunk_factors(b_ptr, bos, eos, pid_h, H, K, BK, BKS, DIAG_RANGE):
        a = tl.zeros([BT, BT], tl.float32)
        for k0 in tl.static_range(0, BK, BKS):
            q, k, eq, ek, _ptr, _m = _slice_factors(
                q_ptr, k_ptr, b_ptr, bos, eos, t64, mt, pid_h, k0, H, K, BKS, DIAG_RANGE
            )
            a += tl.dot(q * eq, tl.trans(k * ek), input_precision="tf32")
        a = tl.where(offs_t[:, None] >= offs_t[None, :], a, 0.0)
        tl.store(a_ptr + (t64[:, None] * H + pid_h) * BT + offs_t[None, :], a, mask=mt[:, None])
    else:
        for I in range(BT // BC):  # a loop, not unrolled: this path is the rare one
            _fwd_row_block(
                q_ptr, k_ptr, b_ptr, a_ptr, bos, eos, I, pid_h, H, K, BT, BC, BK, DIAG_RANGE
            )


@triton.jit
def gla_intra_bwd_v3_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    b_ptr,
    do_ptr,
    dq_ptr,
    dk_ptr,
    g_bos,
    g_eos,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BKS: tl.constexpr,
    BVS: tl.constexpr,
    DIAG_RANGE: tl.constexpr,
):
    """Intra-chunk dq and dk of one chunk, fp32 ``[TT, H, K]``; the grid is (chunks, H)."""
    pid_g, pid_h = tl.program_id(0), tl.program_id(1)
    bos, eos = tl.load(g_bos + pid_g), tl.load(g_eos + pid_g)
    t64, mt, _last, _t0 = _rows(bos, eos, 0, BT)
    offs_t = tl.arange(0, BT)
    if _chunk_factors(b_ptr, bos, eos, pid_h, H, K, BK, BKS, DIAG_RANGE):
        da = tl.zeros([BT, BT], tl.float32)
        for v0 in tl.static_range(0, BV, BVS):
            offs_v = v0 + tl.arange(0, BVS)
            ptr = (t64[:, None] * H + pid_h) * V + offs_v[None, :]
            m = mt[:, None] & (offs_v < V)[None, :]
            do = tl.load(do_ptr + ptr, mask=m, other=0.0)
            v = tl.load(v_ptr + ptr, mask=m, other=0.0)
            da += tl.dot(do, tl.trans(v))
        da = tl.where(offs_t[:, None] >= offs_t[None, :], da * scale, 0.0)  # [i, j]
        for k0 in tl.static_range(0, BK, BKS):
            q, k, eq, ek, ptr, m = _slice_factors(
                q_ptr, k_ptr, b_ptr, bos, eos, t64, mt, pid_h, k0, H, K, BKS, DIAG_RANGE
            )
            dq = eq * tl.dot(da, k * ek, input_precision="tf32")
            dk = ek * tl.dot(tl.trans(da), q * eq, input_precision="tf32")
            tl.store(dq_ptr + ptr, dq, mask=m)
            tl.store(dk_ptr + ptr, dk, mask=m)
    else:
        for X in range(BT // BC):
            _bwd_row_block(
                q_ptr, k_ptr, v_ptr, b_ptr, do_ptr, dq_ptr, dk_ptr, bos, eos, X, scale, pid_h,
                H, K, V, BT, BC, BK, BV, DIAG_RANGE,
            )  # fmt: skip
