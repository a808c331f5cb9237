"""Chunk-parallel Triton kernels of the gated delta rule's WY (UT) transform and its backward.

One program per (chunk, head); tensors and chunk tables as in :mod:`.delta_kernels`. With
``b`` the in-chunk inclusive cumsum of the log gate ``g``, ``gam = exp(b)``, ``D_ij =
exp(b_i - b_j)`` (``i >= j``, else 0) and the strictly lower ``L = tril(beta_i (k_i . k_j)
D_ij, -1)``, the transform is::

    A = (I + L)^-1;   u = A (beta v);   w = A (beta gam k)        (all [C, *], fp32)

``A`` comes from an exact recursive block inversion (2 -> 4 -> ... -> 64) with tensor-core
products (:func:`unit_lower_inv`); it is never a power series.
"""

from __future__ import annotations

import triton
import triton.language as tl

from models.ops.triton_ops.delta_kernels import _rows, _tile

__all__ = ["delta_wy_fwd_kernel", "delta_wy_bwd_kernel", "unit_lower_inv"]


@triton.jit
def unit_lower_inv(L, C: tl.constexpr, PREC: tl.constexpr):
    """``(I + L)^-1`` of a strictly lower-triangular fp32 ``[C, C]`` tile (``C == 64``).

    Exact recursive block inversion, never a power series: on the diagonal 2-blocks the inverse
    is ``I - L`` (their strictly lower part squares to zero); then for the block size ``m`` = 4,
    8, ..., C, with ``T = diag(T1, T2)`` the inverse on the diagonal m/2-blocks and ``X`` the
    lower off-diagonal half of each m-block of L, ``(I + L)^-1 = T - T X T`` on the m-blocks
    (the block formula ``[[T1, 0], [-T2 X T1, T2]]``; products in precision ``PREC``). Every
    entry formed is an entry of an inverse of a principal block of ``I + L``: no intermediate
    grows beyond the result, unlike ``prod (I + (-L)^(2^i))``. Five levels of two tensor-core
    products replace the 64-wide, barrier-bound reductions of a row-by-row substitution.
    """
    r = tl.arange(0, C)
    ri = r[:, None]
    cj = r[None, :]
    t = tl.where(ri == cj, 1.0, 0.0) - tl.where((ri // 2) == (cj // 2), L, 0.0)
    t = _combine(t, L, ri, cj, 4, PREC)
    t = _combine(t, L, ri, cj, 8, PREC)
    t = _combine(t, L, ri, cj, 16, PREC)
    t = _combine(t, L, ri, cj, 32, PREC)
    return _combine(t, L, ri, cj, 64, PREC)


@triton.jit
def _combine(t, L, ri, cj, M: tl.constexpr, PREC: tl.constexpr):
    """Inverse on diagonal M-blocks from the inverse ``t`` on diagonal M/2-blocks."""
    half: tl.constexpr = M // 2
    x = tl.where(((ri // M) == (cj // M)) & ((ri // half) != (cj // half)), L, 0.0)
    xt = tl.dot(x, t, input_precision=PREC)
    return t - tl.dot(t, xt, input_precision=PREC)


@triton.jit
def _uw_dot(a, x, UW_PREC: tl.constexpr, lp: tl.constexpr):
    """``a @ x`` (fp32 result) with both operands rounded to ``lp`` (the inputs' dtype) when
    UW_PREC is "lowp", else as fp32 operands in that input precision."""
    if UW_PREC == "lowp":
        return tl.dot(a.to(lp), x.to(lp))
    else:
        return tl.dot(a.to(tl.float32), x.to(tl.float32), input_precision=UW_PREC)


@triton.jit
def _store_a_times(
    a, x_ptr, out_ptr, row_scale, rows, mi, D: tl.constexpr, BD: tl.constexpr,
    UW_PREC: tl.constexpr, lp: tl.constexpr,
):  # fmt: skip
    """``out = A (row_scale * x)`` for a ``[TT, H, D]`` input, in tiles of BD columns (w from
    k with ``beta gam``, u from v with ``beta``); products as :func:`_uw_dot`."""
    for d0 in tl.static_range(0, D, BD):
        xp, xm = _tile(x_ptr, rows, mi, D, d0 + tl.arange(0, BD))
        xt = tl.load(xp, mask=xm, other=0.0).to(tl.float32)
        op, _ = _tile(out_ptr, rows, mi, D, d0 + tl.arange(0, BD))
        ot = _uw_dot(a, xt * row_scale[:, None], UW_PREC, lp)
        tl.store(op, ot.to(out_ptr.dtype.element_ty), mask=xm)


@triton.jit
def _gates(g_ptr, beta_ptr, rows, mi, HAS_G: tl.constexpr, C: tl.constexpr):
    """In-chunk cumulative log gate b, beta and the decay matrix D ``[C, C]`` (0 above)."""
    if HAS_G:
        bb = tl.cumsum(tl.load(g_ptr + rows, mask=mi, other=0.0).to(tl.float32), 0)
    else:
        bb = tl.zeros([C], tl.float32)
    beta = tl.load(beta_ptr + rows, mask=mi, other=0.0).to(tl.float32)
    r = tl.arange(0, C)
    dmat = tl.exp(tl.where(r[:, None] >= r[None, :], bb[:, None] - bb[None, :], float("-inf")))
    return bb, beta, dmat


@triton.jit
def delta_wy_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    beta_ptr,
    do_ptr,
    b_ptr,
    a_ptr,
    u_ptr,
    w_ptr,
    dd_ptr,
    bos_ptr,
    eos_ptr,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_G: tl.constexpr,
    SOLVE: tl.constexpr,
    STORE_W: tl.constexpr,
    STORE_U: tl.constexpr,
    BWD_PREP: tl.constexpr,
    PREC: tl.constexpr,
    UW_PREC: tl.constexpr,
):
    """WY transform of one chunk. Grid ``(NCh, H)``; BK, BV are the K, V tile widths.

    SOLVE: build L, solve for A and store it (``a`` ``[TT, H, C]`` fp32, row i of the chunk at
    its token) and b ``[TT, H]`` fp32; otherwise A is loaded. PREC: precision of the solve's
    block products, UW_PREC: of the fp32 products with A. Stores w ``[TT, H, K]`` if
    STORE_W and u ``[TT, H, V]`` if STORE_U (A is not read when neither is asked). BWD_PREP
    (backward): stores the chunk-local part of the pseudo-value adjoint,
    ``dd = scale (tril(q k^T) * D)^T do`` ``[TT, H, V]``.
    """
    c, h = tl.program_id(0), tl.program_id(1)
    rows, mi, n_tok, lrow = _rows(bos_ptr, eos_ptr, c, h, H, C)
    bb, beta, dmat = _gates(g_ptr, beta_ptr, rows, mi, HAS_G, C)
    r = tl.arange(0, C)
    ap = a_ptr + rows[:, None] * C + r[None, :]
    am = mi[:, None]
    if SOLVE:
        kk = tl.zeros([C, C], tl.float32)
        for k0 in tl.static_range(0, K, BK):
            kp, km = _tile(k_ptr, rows, mi, K, k0 + tl.arange(0, BK))
            kt = tl.load(kp, mask=km, other=0.0)
            kk += tl.dot(kt, tl.trans(kt))
        lmat = tl.where(r[:, None] > r[None, :], beta[:, None] * kk * dmat, 0.0)
        a = unit_lower_inv(lmat, C, PREC)
        tl.store(ap, a.to(a_ptr.dtype.element_ty), mask=am)
        tl.store(b_ptr + rows, bb, mask=mi)
    elif STORE_W or STORE_U:
        a = tl.load(ap, mask=am, other=0.0)
    lp = k_ptr.dtype.element_ty
    if STORE_W:
        _store_a_times(a, k_ptr, w_ptr, beta * tl.exp(bb), rows, mi, K, BK, UW_PREC, lp)
    if STORE_U:
        _store_a_times(a, v_ptr, u_ptr, beta, rows, mi, V, BV, UW_PREC, lp)
    if BWD_PREP:
        qk = tl.zeros([C, C], tl.float32)
        for k0 in tl.static_range(0, K, BK):
            kp, km = _tile(k_ptr, rows, mi, K, k0 + tl.arange(0, BK))
            qp, _ = _tile(q_ptr, rows, mi, K, k0 + tl.arange(0, BK))
            qk += tl.dot(tl.load(qp, mask=km, other=0.0), tl.trans(tl.load(kp, mask=km, other=0.0)))
        pt = tl.trans(qk * dmat * scale)
        for v0 in tl.static_range(0, V, BV):
            dop, vm = _tile(do_ptr, rows, mi, V, v0 + tl.arange(0, BV))
            ddp, _ = _tile(dd_ptr, rows, mi, V, v0 + tl.arange(0, BV))
            dot_ = tl.load(dop, mask=vm, other=0.0)
            if UW_PREC == "lowp":
                ddt = tl.dot(pt.to(k_ptr.dtype.element_ty), dot_.to(k_ptr.dtype.element_ty))
            else:
                ddt = tl.dot(pt, dot_.to(tl.float32))
            tl.store(ddp, ddt.to(dd_ptr.dtype.element_ty), mask=vm)


@triton.jit
def delta_wy_bwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    beta_ptr,
    a_ptr,
    do_ptr,
    dlt_ptr,
    dd_ptr,
    dw_ptr,
    dqp_ptr,
    dkp_ptr,
    dbp_ptr,
    dq_ptr,
    dk_ptr,
    dv_ptr,
    dbeta_ptr,
    dg_ptr,
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
    HAS_G: tl.constexpr,
    LOWP: tl.constexpr,
):
    """Gradients through the intra-chunk scores and the WY transform. Grid ``(NCh, H)``.

    LOWP: the products' fp32 operands (A, dd, dw, the score and WY adjoints) are rounded to
    k's dtype (16-bit inputs), products still accumulated in fp32; otherwise tf32.

    Inputs (``[TT, H, *]``): ``delta``, its adjoint ``dd`` (from the reverse scan), ``dw`` (the
    adjoint of w), and the inter-chunk parts ``dqp``, ``dkp`` (fp32) and ``dbp`` ``[TT, H, NKP]``
    of dq, dk and of the cumulative-gate gradient, from :func:`delta_dqkw_kernel`. With
    ``dA = dd (beta v)^T + dw (beta gam k)^T``, ``dL = -A^T dA A^T`` (strictly lower part) and
    ``dP = scale do delta^T`` (lower part)::

        dv = beta A^T dd;   dq = dqp + (dP*D) k;
        dk = dkp + beta gam A^T dw + (dP*D)^T q + (F + F^T) k,   F = dL * beta_i D
        dbeta = v.(A^T dd) + gam k.(A^T dw) + rowsum(dL * kk * D)
        db = dbp + beta gam k.(A^T dw) + rowsum - colsum of (dP*D*qk) and of (dL*L)

    and ``dg`` is the in-chunk reverse cumsum of ``db``. Writes dq, dk, dv, dbeta, dg.
    """
    c, h = tl.program_id(0), tl.program_id(1)
    rows, mi, n_tok, lrow = _rows(bos_ptr, eos_ptr, c, h, H, C)
    bb, beta, dmat = _gates(g_ptr, beta_ptr, rows, mi, HAS_G, C)
    r = tl.arange(0, C)
    # A^T loaded directly (A is only used transposed); the [C, C] tiles below are consumed as
    # soon as possible, to keep few of them live at once (register pressure)
    at = tl.load(a_ptr + rows[None, :] * C + r[:, None], mask=mi[None, :], other=0.0)
    lp = k_ptr.dtype.element_ty if LOWP else tl.float32  # operand dtype of the products
    atl = at.to(lp)
    gam = tl.exp(bb)
    bg = beta * gam
    dp = tl.zeros([C, C], tl.float32)
    da = tl.zeros([C, C], tl.float32)
    dbeta = tl.zeros([C], tl.float32)
    for v0 in tl.range(0, V, BV):
        offs_v = v0 + tl.arange(0, BV)
        dop, vm = _tile(do_ptr, rows, mi, V, offs_v)
        dlp, _ = _tile(dlt_ptr, rows, mi, V, offs_v)
        ddp, _ = _tile(dd_ptr, rows, mi, V, offs_v)
        vp, _ = _tile(v_ptr, rows, mi, V, offs_v)
        dl = tl.load(dlp, mask=vm, other=0.0)
        do = tl.load(dop, mask=vm, other=0.0).to(dl.dtype)
        dd = tl.load(ddp, mask=vm, other=0.0)
        vt = tl.load(vp, mask=vm, other=0.0).to(tl.float32)
        dp += tl.dot(do, tl.trans(dl))
        da += tl.dot(dd.to(lp), tl.trans((vt * beta[:, None]).to(lp)))
        atdd = tl.dot(atl, dd.to(lp))
        dvp, _ = _tile(dv_ptr, rows, mi, V, offs_v)
        tl.store(dvp, (atdd * beta[:, None]).to(dv_ptr.dtype.element_ty), mask=vm)
        dbeta += tl.sum(vt * atdd, 1)
    dpd = tl.where(r[:, None] >= r[None, :], dp * dmat * scale, 0.0)
    # three passes over K instead of two, so that at most four [C, C] fp32 tiles are live:
    # q k^T (for the score part of db) and the w-adjoint part of dA, then k k^T
    qk = tl.zeros([C, C], tl.float32)
    for k0 in tl.range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        kp, km = _tile(k_ptr, rows, mi, K, offs_k)
        qp, _ = _tile(q_ptr, rows, mi, K, offs_k)
        dwp, _ = _tile(dw_ptr, rows, mi, K, offs_k)
        kt = tl.load(kp, mask=km, other=0.0)
        qk += tl.dot(tl.load(qp, mask=km, other=0.0), tl.trans(kt))
        kbg = kt.to(tl.float32) * bg[:, None]
        da += tl.dot(tl.load(dwp, mask=km, other=0.0).to(lp), tl.trans(kbg.to(lp)))
    dpp = dpd * qk
    db = tl.sum(dpp, 1) - tl.sum(dpp, 0)
    dl = tl.where(r[:, None] > r[None, :], -tl.dot(tl.dot(atl, da.to(lp)).to(lp), atl), 0.0)
    kk = tl.zeros([C, C], tl.float32)
    for k0 in tl.range(0, K, BK):
        kp, km = _tile(k_ptr, rows, mi, K, k0 + tl.arange(0, BK))
        kt = tl.load(kp, mask=km, other=0.0)
        kk += tl.dot(kt, tl.trans(kt))
    # the decay matrix again from b rather than kept live through the K passes (registers)
    dmat = tl.exp(tl.where(r[:, None] >= r[None, :], bb[:, None] - bb[None, :], float("-inf")))
    f = dl * dmat  # dL * D
    e = f * kk  # dL * kk * D; dL * L = beta_i e
    dbeta += tl.sum(e, 1)
    gl = e * beta[:, None]
    db += tl.sum(gl, 1) - tl.sum(gl, 0)
    f = f * beta[:, None]
    fs = (f + tl.trans(f)).to(lp)
    dpdl = dpd.to(lp)
    dpdt = tl.trans(dpdl)
    for k0 in tl.range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        kp, km = _tile(k_ptr, rows, mi, K, offs_k)
        qp, _ = _tile(q_ptr, rows, mi, K, offs_k)
        dwp, _ = _tile(dw_ptr, rows, mi, K, offs_k)
        kraw = tl.load(kp, mask=km, other=0.0)
        kt = kraw.to(tl.float32)
        ql = tl.load(qp, mask=km, other=0.0).to(lp)
        kl = kraw.to(lp)
        aw = tl.dot(atl, tl.load(dwp, mask=km, other=0.0).to(lp))
        dqpp, _ = _tile(dqp_ptr, rows, mi, K, offs_k)
        dkpp, _ = _tile(dkp_ptr, rows, mi, K, offs_k)
        dq = tl.dot(dpdl, kl, tl.load(dqpp, mask=km, other=0.0).to(tl.float32))
        dk = tl.load(dkpp, mask=km, other=0.0).to(tl.float32) + aw * bg[:, None]
        dk = tl.dot(dpdt, ql, tl.dot(fs, kl, dk))
        kaw = tl.sum(kt * aw, 1)
        dbeta += gam * kaw
        db += bg * kaw
        dqo, _ = _tile(dq_ptr, rows, mi, K, offs_k)
        dko, _ = _tile(dk_ptr, rows, mi, K, offs_k)
        tl.store(dqo, dq.to(dq_ptr.dtype.element_ty), mask=km)
        tl.store(dko, dk.to(dk_ptr.dtype.element_ty), mask=km)
    for i in tl.static_range(NKP):
        db += tl.load(dbp_ptr + rows * NKP + i, mask=mi, other=0.0)
    tl.store(dbeta_ptr + rows, dbeta.to(dbeta_ptr.dtype.element_ty), mask=mi)
    if HAS_G:
        db = tl.where(mi, db, 0.0)
        dg = tl.sum(db, 0) - tl.cumsum(db, 0) + db
        tl.store(dg_ptr + rows, dg.to(dg_ptr.dtype.element_ty), mask=mi)
