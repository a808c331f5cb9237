"""Triton kernels for the per-channel-gate (GLA) intra-chunk terms, chunk 64 in 16-row blocks.

``A_ij = sum_k q_ik k_jk exp(b_ik - b_jk)`` (j <= i) with b the in-chunk cumulative log gate.
Off-diagonal 16-blocks (I > J) factor through ``r_J`` = b at the last row of block J:
``exp(b_i - r_J)`` and ``exp(r_J - b_j)`` both have exponents <= 0, so a tensor-core product is
exact in exact arithmetic and cannot overflow. Diagonal blocks use the full ``[16, 16, BKS]``
products with masked exponents. Every exponent is clamped at 0 so that padded rows (loaded
as zeros) can never produce inf * 0.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["chunk_cumsum_kernel", "gla_intra_fwd_kernel", "gla_intra_bwd_kernel"]


@triton.jit
def _blk(ptr, bos, eos, c, I: tl.constexpr, h, H: tl.constexpr, D: tl.constexpr, offs_d, md,
         BT: tl.constexpr, BC: tl.constexpr):
    t = bos + c * BT + I * BC + tl.arange(0, BC)
    mt = t < eos
    t64 = t.to(tl.int64)
    x = tl.load(ptr + (t64[:, None] * H + h) * D + offs_d[None, :],
                mask=mt[:, None] & md[None, :], other=0.0)
    return x, t64, mt


@triton.jit
def _last(ptr, bos, eos, c, J: tl.constexpr, h, H: tl.constexpr, K: tl.constexpr, offs_k, mk,
          BT: tl.constexpr, BC: tl.constexpr):
    t = bos + c * BT + J * BC + BC - 1
    t = tl.minimum(t, eos - 1)  # rows past the end hold nothing, and are masked by the caller
    return tl.load(ptr + (t.to(tl.int64) * H + h) * K + offs_k, mask=mk, other=0.0)


@triton.jit
def chunk_cumsum_kernel(g_ptr, b_ptr, g_bos, g_eos, H: tl.constexpr, K: tl.constexpr,
                        BT: tl.constexpr, BK: tl.constexpr):
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


@triton.jit
def _diag_e(bi, bj, causal):
    d = tl.where(causal[:, :, None], bi[:, None, :] - bj[None, :, :], float("-inf"))
    return tl.exp(tl.minimum(d, 0.0))


@triton.jit
def gla_intra_fwd_kernel(q_ptr, k_ptr, b_ptr, a_ptr, g_bos, g_eos, H: tl.constexpr,
                         K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                         BKS: tl.constexpr):
    """Unscaled fp32 scores A ``[TT, H, BT]`` (row t, column j of t's chunk; j > i unwritten)."""
    pid_g, pid_h = tl.program_id(0), tl.program_id(1)
    offs_c = tl.arange(0, BC)
    causal = offs_c[:, None] >= offs_c[None, :]
    offs_k = tl.arange(0, BK)
    mk = offs_k < K
    bos, eos = tl.load(g_bos + pid_g), tl.load(g_eos + pid_g)
    for c in range(tl.cdiv(eos - bos, BT)):
        for I in tl.static_range(BT // BC):
            qi, ti, mi = _blk(q_ptr, bos, eos, c, I, pid_h, H, K, offs_k, mk, BT, BC)
            bi, _, _ = _blk(b_ptr, bos, eos, c, I, pid_h, H, K, offs_k, mk, BT, BC)
            for J in tl.static_range(I):
                kj, _, _ = _blk(k_ptr, bos, eos, c, J, pid_h, H, K, offs_k, mk, BT, BC)
                bj, _, _ = _blk(b_ptr, bos, eos, c, J, pid_h, H, K, offs_k, mk, BT, BC)
                r = _last(b_ptr, bos, eos, c, J, pid_h, H, K, offs_k, mk, BT, BC)
                qg = qi.to(tl.float32) * tl.exp(tl.minimum(bi - r[None, :], 0.0))
                kg = kj.to(tl.float32) * tl.exp(tl.minimum(r[None, :] - bj, 0.0))
                a = tl.dot(qg, tl.trans(kg), input_precision="ieee")
                tl.store(a_ptr + (ti[:, None] * H + pid_h) * BT + J * BC + offs_c[None, :], a,
                         mask=mi[:, None])
            a = tl.zeros([BC, BC], tl.float32)
            for k0 in tl.static_range(0, BK, BKS):
                offs_s = k0 + tl.arange(0, BKS)
                ms = offs_s < K
                qs, _, _ = _blk(q_ptr, bos, eos, c, I, pid_h, H, K, offs_s, ms, BT, BC)
                ks, _, _ = _blk(k_ptr, bos, eos, c, I, pid_h, H, K, offs_s, ms, BT, BC)
                bs, _, _ = _blk(b_ptr, bos, eos, c, I, pid_h, H, K, offs_s, ms, BT, BC)
                e = _diag_e(bs, bs, causal)
                a += tl.sum(qs.to(tl.float32)[:, None, :] * ks.to(tl.float32)[None, :, :] * e, 2)
            tl.store(a_ptr + (ti[:, None] * H + pid_h) * BT + I * BC + offs_c[None, :], a,
                     mask=mi[:, None])


@triton.jit
def gla_intra_bwd_kernel(q_ptr, k_ptr, v_ptr, b_ptr, do_ptr, dq_ptr, dk_ptr, g_bos, g_eos,
                         scale, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                         BT: tl.constexpr, BC: tl.constexpr, BKS: tl.constexpr,
                         BV: tl.constexpr):
    """Intra-chunk parts of dq and dk (fp32 ``[TT, H, K]``) from ``dA = scale do v^T``."""
    pid_k, pid_g, pid_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_c = tl.arange(0, BC)
    causal = offs_c[:, None] >= offs_c[None, :]
    offs_v = tl.arange(0, BV)
    mv = offs_v < V
    offs_k = pid_k * BKS + tl.arange(0, BKS)
    mk = offs_k < K
    bos, eos = tl.load(g_bos + pid_g), tl.load(g_eos + pid_g)
    NB: tl.constexpr = BT // BC
    for c in range(tl.cdiv(eos - bos, BT)):
        for I in tl.static_range(NB):
            doi, ti, mi = _blk(do_ptr, bos, eos, c, I, pid_h, H, V, offs_v, mv, BT, BC)
            bi, _, _ = _blk(b_ptr, bos, eos, c, I, pid_h, H, K, offs_k, mk, BT, BC)
            dq = tl.zeros([BC, BKS], tl.float32)
            for J in tl.static_range(I + 1):
                vj, _, _ = _blk(v_ptr, bos, eos, c, J, pid_h, H, V, offs_v, mv, BT, BC)
                kj, _, _ = _blk(k_ptr, bos, eos, c, J, pid_h, H, K, offs_k, mk, BT, BC)
                bj, _, _ = _blk(b_ptr, bos, eos, c, J, pid_h, H, K, offs_k, mk, BT, BC)
                da = tl.dot(doi, tl.trans(vj)) * scale
                if J < I:
                    r = _last(b_ptr, bos, eos, c, J, pid_h, H, K, offs_k, mk, BT, BC)
                    kg = kj.to(tl.float32) * tl.exp(tl.minimum(r[None, :] - bj, 0.0))
                    dq += tl.exp(tl.minimum(bi - r[None, :], 0.0)) * tl.dot(
                        da, kg, input_precision="ieee")
                else:
                    e = _diag_e(bi, bj, causal) * tl.where(causal, da, 0.0)[:, :, None]
                    dq += tl.sum(e * kj.to(tl.float32)[None, :, :], 1)
            tl.store(dq_ptr + (ti[:, None] * H + pid_h) * K + offs_k[None, :], dq,
                     mask=mi[:, None] & mk[None, :])
        for J in tl.static_range(NB):
            vj, tj, mj = _blk(v_ptr, bos, eos, c, J, pid_h, H, V, offs_v, mv, BT, BC)
            bj, _, _ = _blk(b_ptr, bos, eos, c, J, pid_h, H, K, offs_k, mk, BT, BC)
            r = _last(b_ptr, bos, eos, c, J, pid_h, H, K, offs_k, mk, BT, BC)
            dk = tl.zeros([BC, BKS], tl.float32)
            dk_off = tl.zeros([BC, BKS], tl.float32)
            for I in tl.static_range(J, NB):
                doi, _, _ = _blk(do_ptr, bos, eos, c, I, pid_h, H, V, offs_v, mv, BT, BC)
                qi, _, _ = _blk(q_ptr, bos, eos, c, I, pid_h, H, K, offs_k, mk, BT, BC)
                bi, _, _ = _blk(b_ptr, bos, eos, c, I, pid_h, H, K, offs_k, mk, BT, BC)
                da = tl.dot(doi, tl.trans(vj)) * scale
                if I > J:
                    qg = qi.to(tl.float32) * tl.exp(tl.minimum(bi - r[None, :], 0.0))
                    dk_off += tl.dot(tl.trans(da), qg, input_precision="ieee")
                else:
                    e = _diag_e(bi, bj, causal) * tl.where(causal, da, 0.0)[:, :, None]
                    dk += tl.sum(e * qi.to(tl.float32)[:, None, :], 0)
            dk += dk_off * tl.exp(tl.minimum(r[None, :] - bj, 0.0))
            tl.store(dk_ptr + (tj[:, None] * H + pid_h) * K + offs_k[None, :], dk,
                     mask=mj[:, None] & mk[None, :])
