"""Autograd wrapper and launch logic of the non-delta Triton kernels (linear, scalar decay, GLA).

Forward: group-local states -> scan over groups -> outputs replayed per group.
Backward: the same three steps run on the adjoint state (reverse direction) give dk and dv; dq
replays the saved group-start states forward. Per-channel gate gradients use the identity
``dL/dB_t = q_t * dq_t - k_t * dk_t`` for the cumulative log gate ``B_t``, summed in reverse
only within each chunk and closed by the chunk-end state times its adjoint, formed from the
state entering the chunk plus the chunk's own ``k dk'``: a whole-sequence reverse sum would let
rounding grow with T. The scalar gate's gradient sums, for each gate, the token pairs whose
decay contains it, split by chunk so that no two large terms cancel (both: see
:func:`nondelta_kernels.bwd_dk_kernel`).

With an ``exchange`` (LASP-2 inside the op, :func:`nondelta_attn`) the scan over groups runs
twice: from zero, giving each sequence's final state ``M`` for the exchange, then from the
incoming state it returns; the reverse scan likewise, around the exchange of state gradients.
"""

from __future__ import annotations

import torch
import triton

from models.ops.triton_ops import nondelta_kernels as kern
from models.ops.triton_ops.common import check_inputs, env_setting, make_groups, tile_width
from models.ops.triton_ops.gla_intra import gla_cumulative_gate, gla_intra_grads, gla_scores

__all__ = ["nondelta_attn"]


_BT = 64


def _config(K: int, V: int):
    bk_full, bv_full = tile_width(K), tile_width(V)
    bv = min(64, bv_full)  # state tile columns in the output / dv kernels
    bk = min(64, bk_full)  # state tile rows in the dq / dk kernels
    return bk_full, bv_full, bk, bv


def _state_bv(gate: int, bv: int, bv_full: int) -> int:
    """V tile of the local-state kernels: with per-channel gates a wider tile computes each
    ``exp`` of the [chunk, K-block] gate tile for fewer programs (``LINSCALE_KERNEL_GLA_STATE_BV``,
    default 128, capped at V's padded width; 9.26 against 9.83 ms GLA fwd+bwd with 64 at 8K x 8
    on an H100)."""
    if gate != 2:
        return bv
    return min(bv_full, env_setting("LINSCALE_KERNEL_GLA_STATE_BV", 128, (64, 128, 256)))


def _exact_pairs(dtype) -> bool:
    """How the scalar gate gradient forms the pairs inside a chunk (``LINSCALE_KERNEL_SCALAR_PAIRS``).

    "exact": from one fp32 tile of pair terms in the dk kernel (one more product); "split": as
    ``q . dq`` (dq kernel) minus ``k . dk`` (dk kernel), which cancel exactly where both
    products round the same operands, true for 16-bit inputs (exact in the tensor cores) but
    not for fp32 ones (tf32-rounded there: the diagonal terms then fail to cancel under strong
    gates; and both kernels must round the pair tile ``do v^T * D * scale`` alike, scale
    inside). "auto" (default): exact for fp32 inputs, split otherwise.
    """
    mode = env_setting("LINSCALE_KERNEL_SCALAR_PAIRS", "auto", ("auto", "exact", "split"))
    return mode == "exact" or (mode == "auto" and dtype == torch.float32)


def _per_head(g: torch.Tensor) -> bool:
    """Whether the scalar gate ``g`` ``[B, T, H]`` is one log decay per head, seen from its
    strides: a view expanded over B and T (stride 0), as the lightning and retention layers pass
    their fixed decays. The kernels then form the in-chunk decays from the ``[H]`` vector (no
    per-token loads or sums). A materialised copy of the same values takes the per-token path."""
    return (
        g.dim() == 3
        and (g.shape[1] == 1 or g.stride(1) == 0)
        and (g.shape[0] == 1 or g.stride(0) == 0)
    )


def _launch_opts(dtype, *tiles: int) -> dict:
    # fp32 tiles are twice the bytes: one pipeline stage keeps them inside shared memory.
    return dict(
        num_warps=8 if max(tiles) >= 128 * 128 else 4, num_stages=1 if dtype == torch.float32 else 2
    )


def _group_scan(m, dl, h_in, hs, final, grp, gate: int, dims: tuple, *, reverse: bool) -> None:
    """Compose the group-local states ``m`` ``[G, H, K, V]`` (decays ``dl``) over each
    sequence's groups: ``hs`` gets every group's incoming state (reverse: its adjoint), from
    ``h_in`` ``[N, H, K, V]`` (None: zero); ``final`` (None: not stored) the state leaving each
    sequence (reverse: the adjoint at its start)."""
    K, V, bk, bv = dims
    N, H = grp.n_seq, m.shape[1]
    kern.group_scan_kernel[(triton.cdiv(K, bk) * triton.cdiv(V, bv), N, H)](
        m,
        dl,
        h_in if h_in is not None else hs,
        hs,
        final if final is not None else hs,
        grp.seq_g0,
        H=H,
        K=K,
        V=V,
        BK=bk,
        BV=bv,
        GATE=gate,
        REVERSE=reverse,
        HAS_H0=h_in is not None,
        STORE_FINAL=final is not None,
    )


class _NonDelta(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, h0, scale, cu_seqlens, gate, output_final_state, exchange):
        B, T, H, K = q.shape
        V = v.shape[-1]
        TT = B * T
        bt = _BT
        bkf, bvf, bk, bv = _config(K, V)
        nk, nv = triton.cdiv(K, bk), triton.cdiv(V, bv)
        grp = make_groups(B, T, cu_seqlens, chunk=bt, programs_per_group=H * nv, device=q.device)
        G, N = grp.n_groups, grp.n_seq
        q, k, v = (x.contiguous().view(TT, H, -1) for x in (q, k, v))
        head_g = gate == 1 and not ctx.needs_input_grad[3] and _per_head(g)
        if head_g:
            gf = g[0, 0].float().contiguous()  # [H]: one log decay per head
        else:
            gf = g.contiguous().view(TT, H, *g.shape[3:]) if g is not None else q
        f32 = dict(device=q.device, dtype=torch.float32)
        a = q
        cgrp = None
        if gate == 2:
            # The intra-chunk kernels need no state: one program per chunk (and head).
            cgrp = make_groups(
                B, T, cu_seqlens, chunk=bt, programs_per_group=H, device=q.device, group_tokens=bt
            )
            gf = gla_cumulative_gate(gf, cgrp, bk)
            a = gla_scores(q, k, gf, cgrp, bkf)
        m = torch.empty(G, H, K, V, **f32)
        dl = torch.empty(G, H, K, **f32) if gate == 2 else torch.empty(G, H, **f32)
        sbv = _state_bv(gate, bv, bvf)
        kern.local_state_kernel[(nk * triton.cdiv(V, sbv), G, H)](
            k,
            v,
            gf,
            m,
            dl,
            grp.bos,
            grp.eos,
            scale,
            H=H,
            K=K,
            V=V,
            BT=bt,
            BK=bk,
            BV=sbv,
            GATE=gate,
            HEAD_G=head_g,
            REVERSE=False,
            **_launch_opts(q.dtype, bk * sbv),
        )
        hs = torch.empty(G, H, K, V, **f32)

        def scan(h_in, final):
            _group_scan(m, dl, h_in, hs, final, grp, gate, (K, V, bk, bv), reverse=False)

        ht = torch.empty(N, H, K, V, **f32) if output_final_state else None
        if exchange is not None:
            # Each sequence's state from zero (M) and its total decay (A) go to the exchange,
            # which returns the incoming states; the scan then runs again from them.
            M = torch.empty(N, H, K, V, **f32)
            scan(None, M)
            A = None if gate == 0 else g.float().sum(1).exp()
            h0 = exchange.forward(A, M).contiguous()
        scan(h0.contiguous() if h0 is not None else None, ht)
        o = torch.empty(TT, H, V, device=q.device, dtype=v.dtype)
        kern.fwd_o_kernel[(nv, G, H)](
            q,
            k,
            v,
            gf,
            a,
            hs,
            o,
            grp.bos,
            grp.eos,
            scale,
            H=H,
            K=K,
            V=V,
            BT=bt,
            BK=bkf,
            BV=bv,
            GATE=gate,
            HEAD_G=head_g,
            **_launch_opts(q.dtype, bkf * bv, bt * bkf),
        )
        ctx.exchange = exchange
        ctx.save_for_backward(q, k, v, gf, None if exchange is not None else h0, a, hs, dl)
        ctx.meta = (
            B,
            T,
            H,
            K,
            V,
            scale,
            gate,
            grp,
            cgrp,
            None if g is None else (g.shape, g.dtype),
            head_g,
        )
        return o.view(B, T, H, V), (ht if output_final_state else None)

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, gf, h0, a, hs, dl = ctx.saved_tensors
        B, T, H, K, V, scale, gate, grp, cgrp, g_meta, head_g = ctx.meta
        TT = B * T
        bt = _BT
        bkf, bvf, bk, bv = _config(K, V)
        nk, nv = triton.cdiv(K, bk), triton.cdiv(V, bv)
        G, N = grp.n_groups, grp.n_seq
        do = do.contiguous().view(TT, H, V)
        f32 = dict(device=q.device, dtype=torch.float32)
        dm = torch.empty(G, H, K, V, **f32)
        sbv = _state_bv(gate, bv, bvf)
        kern.local_state_kernel[(nk * triton.cdiv(V, sbv), G, H)](
            q,
            do,
            gf,
            dm,
            dl,
            grp.bos,
            grp.eos,
            scale,
            H=H,
            K=K,
            V=V,
            BT=bt,
            BK=bk,
            BV=sbv,
            GATE=gate,
            HEAD_G=head_g,
            REVERSE=True,
            **_launch_opts(q.dtype, bk * sbv),
        )
        he = torch.empty(G, H, K, V, **f32)
        dh0 = torch.empty(N, H, K, V, **f32)

        def scan(d_final, store_dh0):
            fin = dh0 if store_dh0 else None
            _group_scan(dm, dl, d_final, he, fin, grp, gate, (K, V, bk, bv), reverse=True)

        dht = dht.contiguous().float() if dht is not None else None
        finish = None
        if ctx.exchange is not None:
            # The gradient of each incoming state from this op's outputs goes to the exchange,
            # which returns the gradient of the state leaving each sequence (from the later
            # ones); the reverse scan then runs again from it. With it, the gate gradient below
            # also covers the total decay A handed to the exchange. The dq kernel, which needs
            # no adjoint state, runs while the exchange is in flight.
            scan(None, True)
            finish = ctx.exchange.backward(dh0)
        else:
            scan(dht, True)
        # the scalar gate may need no gradient (fixed per-head decays: lightning, retention);
        # then no per-chunk state, q . dq or gate gradient is formed
        dg_needed = gate == 2 or (gate == 1 and ctx.needs_input_grad[3])
        dqi = dki = q
        if gate == 2:
            dqi, dki = gla_intra_grads(q, k, v, gf, do, cgrp, scale, bkf, bvf)
        # The gate gradient needs q.dq from the fp32 accumulator (a bf16-rounded dq put the bf16
        # gate gradient at 1.01e-2 relative error on the H100 check). GATE 2 re-reads dq in the dk
        # kernel, so it stays fp32 there; GATE 1 only needs the per-token, per-K-block sum
        # ``sq`` [NK, H, TT], written by the dq kernel, and stores dq in q's dtype.
        dq = torch.empty(TT, H, K, device=q.device, dtype=torch.float32 if gate == 2 else q.dtype)
        dk = torch.empty(TT, H, K, device=q.device, dtype=k.dtype)
        dv = torch.empty(TT, H, V, device=q.device, dtype=v.dtype)
        hc = q
        if dg_needed:
            hc = torch.empty(grp.n_chunks, H, K, V, device=q.device, dtype=q.dtype)
        g_shape, g_dtype = g_meta if gate else (None, None)
        dg = sq = dqo = q
        if gate == 2:
            dg = torch.empty(TT, H, K, device=q.device, dtype=g_dtype)
            dqo = torch.empty(TT, H, K, device=q.device, dtype=q.dtype)
        elif dg_needed:
            dg = torch.empty(nk, TT, H, **f32)
            sq = torch.empty(nk, H, TT, **f32)
        opts = _launch_opts(q.dtype, bk * bvf, bt * bvf)
        exact_pairs = gate == 1 and dg_needed and _exact_pairs(q.dtype)
        if gate:  # 4 warps measured faster than 8 on the H100 (4.13 vs 5.23 ms, scalar, 8K)
            opts["num_warps"] = env_setting("LINSCALE_KERNEL_GATED_BWD_WARPS", 4, (4, 8))
        kern.bwd_dq_kernel[(nk, G, H)](
            q,
            k,
            v,
            gf,
            do,
            dqi,
            hs,
            dq,
            hc,
            sq,
            grp.bos,
            grp.eos,
            grp.c0,
            scale,
            TT,
            H=H,
            K=K,
            V=V,
            BT=bt,
            BK=bk,
            BV=bvf,
            GATE=gate,
            HEAD_G=head_g,
            EXACT_PAIRS=exact_pairs,
            DG=dg_needed,
            **opts,
        )
        if finish is not None:
            scan(finish().contiguous(), False)
        kern.bwd_dk_kernel[(nk, G, H)](
            q,
            k,
            v,
            gf,
            do,
            dki,
            he,
            dq,
            hc,
            sq,
            dk,
            dg,
            dqo,
            grp.bos,
            grp.eos,
            grp.c0,
            scale,
            TT,
            H=H,
            K=K,
            V=V,
            BT=bt,
            BK=bk,
            BV=bvf,
            GATE=gate,
            HEAD_G=head_g,
            EXACT_PAIRS=exact_pairs,
            DG=dg_needed,
            **opts,
        )
        kern.bwd_dv_kernel[(nv, G, H)](
            q,
            k,
            gf,
            do,
            a,
            he,
            dv,
            grp.bos,
            grp.eos,
            scale,
            H=H,
            K=K,
            V=V,
            BT=bt,
            BK=bkf,
            BV=bv,
            GATE=gate,
            HEAD_G=head_g,
            **_launch_opts(q.dtype, bkf * bv, bt * bkf),
        )
        dgo = None
        if gate == 1 and dg_needed:
            dgo = dg.sum(0).view(g_shape).to(g_dtype)
        elif gate == 2:
            dgo, dq = dg.view(g_shape), dqo
        dq = dq.view(B, T, H, K)
        dk = dk.view(B, T, H, K)
        dh0 = dh0.to(h0.dtype) if h0 is not None else None
        return dq, dk, dv.view(B, T, H, V), dgo, dh0, None, None, None, None, None


def nondelta_attn(
    q,
    k,
    v,
    g,
    gate: int,
    *,
    scale=None,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
    exchange=None,
):
    """Shared entry of chunk_linear_attn (gate 0 or 1) and chunk_gla (gate 2); returns (o, ht).

    ``exchange`` (sequence parallelism, LASP-2 inside the op; no initial_state, final state or
    cu_seqlens with it): an object with ``forward(A, M) -> S_in`` and ``backward(dS_in)``, which
    starts the backward exchange and returns a function that finishes it and returns ``U``.
    ``M`` ``[B, H, K, V]`` is each sequence's final state from a zero state and ``A`` its total
    decay (None, ``[B, H]`` or ``[B, H, K]``, fp32); ``S_in`` the states to start from. In the
    backward ``dS_in`` is the gradient of ``S_in`` from this op's output alone and ``U`` the
    gradient of the state leaving each sequence (``A ∘ S_in + M``), from whatever follows it.
    """
    check_inputs(
        q, k, v, initial_state, cu_seqlens, g=g if gate == 1 else None, gk=g if gate == 2 else None
    )
    if exchange is not None and (
        initial_state is not None or output_final_state or cu_seqlens is not None
    ):
        raise ValueError(
            "exchange takes no initial_state, output_final_state or cu_seqlens: the incoming "
            "states come from the exchange"
        )
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if q.shape[1] == 0:
        raise ValueError("T must be >= 1")
    return _NonDelta.apply(
        q,
        k,
        v,
        g,
        initial_state,
        float(scale),
        cu_seqlens,
        gate,
        bool(output_final_state),
        exchange,
    )
