"""Gated delta rule on the GPU: Triton kernels for the forward and a hand-written backward.

Chunks of ``C = 64`` tokens (never crossing a sequence or document end) on the token-major
inputs, no padding copies. Kernels (in launch order):

forward
    1. :func:`~.delta_wy_kernels.delta_wy_fwd_kernel` (chunk x head): in-chunk cumulative gate
       b, ``A = (I + L)^-1`` (exact in-register solve), ``u = A beta v``, ``w = A beta gam k``.
    2. :func:`~.delta_kernels.delta_scan_fwd_kernel` (sequence x head x V tile, sequential over
       chunks): ``delta = u - w h``, ``h' = gam_C h + (k gam_C/gam)^T delta``; stores the
       chunk-start states and delta. With few long sequences the scan runs in segments
       across the SMs (:mod:`.delta_scan`: transition products, a pass across segments,
       replay; one 128K sequence fwd+bwd 21.2 -> 18.2 ms on the H100).
    3. :func:`~.delta_chunk_kernels.delta_out_kernel` (chunk x head x V tile): the output.

backward (A, b, w, the chunk-start states and delta are kept from the forward)
    1. only with ``LINSCALE_DELTA_KEEP_W=off`` (the forward then drops w: one ``[TT, H, K]``
       tensor less kept; H100 8K x 8 bf16 fwd+bwd 7.73 against 7.54 ms) or
       ``LINSCALE_DELTA_LOCAL_DD=off``: the WY kernel again, recomputing w from A and/or
       writing the chunk-local ``d delta = scale P^T do``.
    2. :func:`~.delta_kernels.delta_scan_bwd_kernel`: reverse scan of the state adjoint (in
       segments as the forward's); forms the chunk-local part of ``d delta`` from the q and k
       it loads (for bf16 intermediates and K <= 128; 8K x 8: 7.54 -> 7.24 ms), completes it
       and stores it, the chunk-end adjoints and ``dh0``.
    3. :func:`~.delta_chunk_kernels.delta_dqkw_kernel` (chunk x head x K tile): the parts of
       dq, dk, db that go through the states, and ``dw``.
    4. :func:`~.delta_wy_kernels.delta_wy_bwd_kernel` (chunk x head): through the intra-chunk
       scores and the WY transform; dq, dk, dv, dbeta and dg (reverse in-chunk cumsum of db).

Accumulation inside the kernels is fp32 (products on tensor cores). For fp32 inputs every
intermediate is fp32 and the products tf32 (the block combinations of the triangular solve and
the products with A 3xTF32). For fp16 inputs the intermediates stay fp32 as well and those
products run TF32 (fp16's range is too narrow for the adjoints; fp16 was not timed). For bf16
inputs (:func:`_store_dtype`) u, w, delta, the chunk-start states, their adjoints, the
pseudo-value adjoint dd and the inter-chunk gradient parts dq, dk, dw are stored in bf16 and
the products take bf16 operands, A included (stored in bf16 once every product that reads it
rounds it; b stays fp32, the solve runs TF32). On the H100 at 8K x 8 x 16 heads this took
fwd+bwd from 16.5 to 7.7 ms (with the tile and warp defaults below), the worst relative error
against the fp32 reference from 3.0e-3 to 3.8e-3 (benchmarks/results/delta_quick_*_h100.json).

Launch settings, read at every call (each is a launch parameter or constexpr, so changing one
between calls compiles a new variant), invalid values raise ValueError:
``LINSCALE_DELTA_STORE`` (auto, fp32: fp32 intermediates for bf16 inputs too),
``LINSCALE_DELTA_KEEP_W`` (on, off), ``LINSCALE_DELTA_LOCAL_DD`` (auto, on, off),
``LINSCALE_DELTA_SCAN_SEGMENT`` (chunks per scan segment, 0 = none; :mod:`.delta_scan`),
``LINSCALE_DELTA_WYBWD_LOWP`` (auto, off: tf32 products in the WY backward),
``LINSCALE_DELTA_SOLVE_PREC`` / ``LINSCALE_DELTA_UW_PREC`` (tf32x3, tf32, ieee, and lowp for
UW; see :func:`_prec`), ``LINSCALE_DELTA_{WY,OUT,DQKW,WYBWD}_WARPS`` (4, 8; the WY backward
defaults to 4 with bf16 operands, 8 otherwise), ``LINSCALE_DELTA_SCAN_STAGES`` (1-3),
``LINSCALE_DELTA_SCAN_BV`` (16, 32, 64; both scans), ``LINSCALE_DELTA_SCAN_FWD_BV`` (the
forward scan's, over the former), ``LINSCALE_DELTA_OUT_BV`` (32, 64, 128; default 64),
``LINSCALE_DELTA_DQKW_BV`` (16, 32, 64; default 64
for bf16 inputs, 32 otherwise), ``LINSCALE_DELTA_DQKW_BK`` (32, 64, 128; default 64) and
``LINSCALE_DELTA_WYBWD_BLOCK`` (16, 32, 64: the K and V tile widths of the WY backward,
default 64, measured fastest on the H100). The dq/dk/w kernel runs one pipeline stage: with
two (1.5% faster) the H100 gave 1.6% relative error in the layer-0 k/beta projection gradients
of a narrowed Gated DeltaNet model at T = 1000 (tests/gpu/test_trainer_gpu.py) against 2.3e-3
with one; the kernel tests had not shown it.
"""

from __future__ import annotations

import torch
import triton

from models.ops.triton_ops import delta_chunk_kernels as ck
from models.ops.triton_ops import delta_wy_kernels as wk
from models.ops.triton_ops.common import check_inputs, env_setting, make_groups, tile_width
from models.ops.triton_ops.delta_scan import plan_scan, scan_backward, scan_forward

__all__ = ["chunk_gated_delta_rule"]

_C = 64  # chunk length (the in-kernel solve assumes 64)


_PRECS = ("tf32x3", "tf32", "ieee")


def _prec(x: torch.Tensor) -> dict:
    """Precisions of the fp32 products of the WY kernel: the solve's block combinations
    (``LINSCALE_DELTA_SOLVE_PREC``; default 3xTF32 for fp32 inputs and TF32 for 16-bit ones,
    whose keys are already rounded to 8 bits: TF32 leaves ~5e-4 relative error in A, 3xTF32
    fp32-level error at twice the registers) and ``A (beta v)``, ``A (beta gam k)``
    (``LINSCALE_DELTA_UW_PREC``; 3xTF32 for fp32 inputs, TF32 for fp16 ones, lowp for bf16
    ones: both operands rounded to bf16, in which u and w are stored anyway; also the backward's
    ``scale (q k^T * D)^T do``). Values: tf32x3, tf32, ieee, and for UW lowp. The interpreter
    takes "ieee"."""
    if x.device.type != "cuda":
        return dict(PREC="ieee", UW_PREC="ieee")
    lowp = x.dtype != torch.float32
    solve = env_setting("LINSCALE_DELTA_SOLVE_PREC", "tf32" if lowp else "tf32x3", _PRECS)
    uw_auto = "lowp" if x.dtype == torch.bfloat16 else "tf32" if lowp else "tf32x3"
    uw = env_setting("LINSCALE_DELTA_UW_PREC", uw_auto, (*_PRECS, "lowp"))
    return dict(PREC=solve, UW_PREC=uw)


def _store_dtype(x: torch.Tensor) -> torch.dtype:
    """Storage dtype of the intermediates u, w, delta, the per-chunk states and adjoints, dd
    and the inter-chunk gradient parts: bf16 for bf16 inputs (the kernels' products with them
    then run in it, fp32 accumulation), fp32 for fp32 and fp16 inputs (fp16's range is too
    narrow for the adjoints). ``LINSCALE_DELTA_STORE=fp32`` keeps them fp32 for
    bf16 inputs as well (auto, fp32)."""
    mode = env_setting("LINSCALE_DELTA_STORE", "auto", ("auto", "fp32"))
    return x.dtype if mode == "auto" and x.dtype == torch.bfloat16 else torch.float32


def _wybwd_lowp(x: torch.Tensor) -> bool:
    """Whether the WY backward rounds its fp32 product operands to bf16
    (``LINSCALE_DELTA_WYBWD_LOWP``: auto = yes for bf16 inputs, off = tf32 products)."""
    mode = env_setting("LINSCALE_DELTA_WYBWD_LOWP", "auto", ("auto", "off"))
    return mode == "auto" and x.dtype == torch.bfloat16


def _keep_w() -> bool:
    """Whether the forward keeps w for the backward (``LINSCALE_DELTA_KEEP_W``: on, off = the
    backward recomputes it from A; on costs one ``[TT, H, K]`` tensor in the storage dtype)."""
    return env_setting("LINSCALE_DELTA_KEEP_W", "on", ("on", "off")) == "on"


def _local_dd(K: int, store: torch.dtype) -> bool:
    """Whether the reverse scan forms the chunk-local pseudo-value adjoint ``scale P^T do``
    from the q and k it loads anyway (``LINSCALE_DELTA_LOCAL_DD``: auto, on, off; off = a
    separate chunk-parallel pass writes it first and the scan reads it). auto = on for bf16
    intermediates and K <= 128; wider K or fp32 intermediates spill in the scan (sm_90
    compile statistics: 370 and 240 bytes at 4 warps; H100, fp32 intermediates: 14.48
    against 14.32 ms at 8K x 8, 20.71 against 19.16 at 32K x 2)."""
    mode = env_setting("LINSCALE_DELTA_LOCAL_DD", "auto", ("auto", "on", "off"))
    if mode == "auto":
        return K <= 128 and store == torch.bfloat16
    return mode == "on"


def _warps(name: str, default: int) -> int:
    """``num_warps`` of one kernel from ``LINSCALE_DELTA_<name>_WARPS`` (4 or 8)."""
    return env_setting(f"LINSCALE_DELTA_{name}_WARPS", default, (4, 8))


class _GatedDelta(torch.autograd.Function):
    """(q, k, v, g | None, beta, h0 | None) token-major -> (o, ht | None)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, h0, scale, cu_seqlens, output_final_state):
        B, T, H, K = q.shape
        V = v.shape[-1]
        TT = B * T
        dev = q.device
        grp = make_groups(
            B, T, cu_seqlens, chunk=_C, programs_per_group=H, device=dev, group_tokens=_C
        )
        nch, N = grp.n_groups, grp.n_seq
        q, k, v = (x.contiguous().view(TT, H, -1) for x in (q, k, v))
        beta = beta.contiguous().view(TT, H)
        gf = g.contiguous().view(TT, H) if g is not None else beta
        f32 = dict(device=dev, dtype=torch.float32)
        sd = dict(device=dev, dtype=_store_dtype(q))
        bk, bv = min(64, tile_width(K)), min(64, tile_width(V))
        b = torch.empty(TT, H, **f32)
        # A in the inputs' dtype when every product that reads it rounds it to that dtype anyway
        prec = _prec(q)
        a_lowp = sd["dtype"] != torch.float32 and prec["UW_PREC"] == "lowp" and _wybwd_lowp(q)
        a = torch.empty(TT, H, _C, device=dev, dtype=q.dtype if a_lowp else torch.float32)
        u = torch.empty(TT, H, V, **sd)
        w = torch.empty(TT, H, K, **sd)
        wk.delta_wy_fwd_kernel[(nch, H)](
            q, k, v, gf, beta, q, b, a, u, w, u, grp.bos, grp.eos, scale,
            H=H, K=K, V=V, C=_C, BK=bk, BV=bv, HAS_G=g is not None, SOLVE=True, STORE_W=True,
            STORE_U=True, BWD_PREP=False, **prec, num_warps=_warps("WY", 4), num_stages=1,
        )  # fmt: skip
        hc = torch.empty(nch, H, K, V, **sd)
        dlt = torch.empty(TT, H, V, **sd)
        ht = torch.empty(N, H, K, V, **f32) if output_final_state else b
        plan = plan_scan(grp, B, T, cu_seqlens, H, K, V)
        h0c = h0.contiguous() if h0 is not None else None
        p_seg = scan_forward(
            plan, grp, k, w, u, b, h0c, hc, dlt, ht,
            H=H, K=K, V=V, C=_C, store_final=output_final_state,
        )  # fmt: skip
        del u
        keep_w = _keep_w()
        if not keep_w:
            del w
        o = torch.empty(TT, H, V, device=dev, dtype=v.dtype)
        bvo = min(env_setting("LINSCALE_DELTA_OUT_BV", 64, (32, 64, 128)), tile_width(V))
        ck.delta_out_kernel[(triton.cdiv(V, bvo), nch, H)](
            q, k, b, hc, dlt, o, grp.bos, grp.eos, scale,
            H=H, K=K, V=V, C=_C, BK=bk, BV=bvo, num_warps=_warps("OUT", 4), num_stages=1,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, g, beta, h0, a, b, hc, dlt, w if keep_w else None, p_seg)
        ctx.meta = (B, T, H, K, V, scale, grp, plan)
        return o.view(B, T, H, V), (ht if output_final_state else None)

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, h0, a, b, hc, dlt, w, p_seg = ctx.saved_tensors
        B, T, H, K, V, scale, grp, plan = ctx.meta
        TT = B * T
        dev = q.device
        nch, N = grp.n_groups, grp.n_seq
        f32 = dict(device=dev, dtype=torch.float32)
        sd = dict(device=dev, dtype=hc.dtype)
        bk, bv = min(64, tile_width(K)), min(64, tile_width(V))
        bkd = min(
            env_setting("LINSCALE_DELTA_DQKW_BK", 64, (32, 64, 128)), tile_width(K)
        )  # dqkw K tile
        nkp = triton.cdiv(K, bkd)  # K tiles of the dqkw kernel: columns of the gate-gradient part
        gf = g.contiguous().view(TT, H) if g is not None else beta
        do = do.contiguous().view(TT, H, V)
        recompute_w = w is None
        if recompute_w:
            w = torch.empty(TT, H, K, **sd)
        dd = torch.empty(TT, H, V, **sd)
        local_dd = _local_dd(K, sd["dtype"])  # the reverse scan forms dd's local part
        if recompute_w or not local_dd:
            wk.delta_wy_fwd_kernel[(nch, H)](
                q, k, v, gf, beta, do, b, a, dd, w, dd, grp.bos, grp.eos, scale,
                H=H, K=K, V=V, C=_C, BK=bk, BV=bv, HAS_G=g is not None, SOLVE=False,
                STORE_W=recompute_w, STORE_U=False, BWD_PREP=not local_dd, **_prec(q),
                num_warps=_warps("WY", 4), num_stages=1,
            )  # fmt: skip
        dhc = torch.empty(nch, H, K, V, **sd)
        dh0 = torch.empty(N, H, K, V, **f32)
        dhtc = dht.contiguous() if dht is not None else None
        scan_backward(
            plan, grp, p_seg, q, k, w, b, do, dd, dhtc, dhc, dh0, scale,
            H=H, K=K, V=V, C=_C, local_dd=local_dd,
        )  # fmt: skip
        dqp = torch.empty(TT, H, K, **sd)
        dkp = torch.empty(TT, H, K, **sd)
        dbp = torch.empty(TT, H, nkp, **f32)
        dw = w if recompute_w else torch.empty_like(w)  # dqkw writes it over a recomputed w
        lowp = sd["dtype"] != torch.float32
        bvd = env_setting("LINSCALE_DELTA_DQKW_BV", 64 if lowp else 32, (16, 32, 64))  # its V tile
        ck.delta_dqkw_kernel[(nkp, nch, H)](
            q, k, b, hc, dhc, do, dlt, dd, dqp, dkp, dw, dbp, grp.bos, grp.eos, scale,
            H=H, K=K, V=V, C=_C, BK=bkd, BV=min(bvd, bv), NKP=nkp, num_warps=_warps("DQKW", 8),
            num_stages=1,  # 2 stages gave 1.6% gradient errors on the H100 (see module doc)
        )  # fmt: skip
        del dhc
        dq = torch.empty_like(q)
        dk = torch.empty_like(k)
        dv = torch.empty_like(v)
        dbeta = torch.empty_like(beta)
        dg = torch.empty(TT, H, device=dev, dtype=g.dtype) if g is not None else dbeta
        bkb = env_setting("LINSCALE_DELTA_WYBWD_BLOCK", 64, (16, 32, 64))  # its K and V tile widths
        wlow = _wybwd_lowp(q)  # bf16 product operands: 4 warps measured faster (spills or not)
        wk.delta_wy_bwd_kernel[(nch, H)](
            q, k, v, gf, beta, a, do, dlt, dd, dw, dqp, dkp, dbp, dq, dk, dv, dbeta, dg,
            grp.bos, grp.eos, scale,
            H=H, K=K, V=V, C=_C, BK=min(bkb, bk), BV=min(bkb, bv), NKP=nkp, HAS_G=g is not None,
            LOWP=wlow, num_warps=_warps("WYBWD", 4 if wlow else 8), num_stages=1,
        )  # fmt: skip
        dh0 = dh0.to(h0.dtype) if h0 is not None else None
        return (
            dq.view(B, T, H, K),
            dk.view(B, T, H, K),
            dv.view(B, T, H, V),
            dg.view(B, T, H) if g is not None else None,
            dbeta.view(B, T, H),
            dh0,
            None,
            None,
            None,
        )


def chunk_gated_delta_rule(
    q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None
):
    """Gated delta rule; same signature and return value as
    :func:`models.ops.reference.chunk_gated_delta_rule`.

    q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, g ``[B, T, H]`` log decay (or None), beta
    ``[B, T, H]``; initial_state ``[B or N, H, K, V]``. Returns o ``[B, T, H, V]`` in v's dtype
    and the fp32 final state (or None).
    """
    check_inputs(q, k, v, initial_state, cu_seqlens, g=g, beta=beta)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if k.dtype != q.dtype:  # the kernels multiply q and k in their own dtype
        k = k.to(q.dtype)
    return _GatedDelta.apply(
        q, k, v, g, beta, initial_state, float(scale), cu_seqlens, bool(output_final_state)
    )
