"""Autograd wrapper and launch logic of the non-delta Triton kernels (linear, scalar decay, GLA).

Forward: group-local states -> scan over groups -> outputs replayed per group.
Backward: the same three steps run on the adjoint state (reverse direction) give dk and dv; dq
replays the saved group-start states forward. Gate gradients use the identity
``dL/dB_t = q_t * dq_t - k_t * dk_t`` for the cumulative log gate ``B_t`` (plus the final
state's ``sum_v dht * ht`` at the sequence end), then a reverse cumulative sum per sequence.
"""

from __future__ import annotations

import torch
import triton

from models.ops.triton_ops import nondelta_kernels as kern
from models.ops.triton_ops.common import check_inputs, make_groups, seq_reverse_cumsum

__all__ = ["nondelta_attn"]


def _p2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


def _config(K: int, V: int, gate: int):
    bt = 16 if gate == 2 else 64
    bk_full, bv_full = _p2(K), _p2(V)
    bv = min(64, bv_full)  # state tile columns in the output / dv kernels
    bk = min(64, bk_full)  # state tile rows in the dq / dk kernels
    return bt, bk_full, bv_full, bk, bv


def _warps(*tiles: int) -> int:
    return 8 if max(tiles) >= 128 * 128 else 4


class _NonDelta(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, h0, scale, cu_seqlens, gate, output_final_state):
        B, T, H, K = q.shape
        V = v.shape[-1]
        TT = B * T
        bt, bkf, bvf, bk, bv = _config(K, V, gate)
        nk, nv = triton.cdiv(K, bk), triton.cdiv(V, bv)
        grp = make_groups(B, T, cu_seqlens, chunk=bt, programs_per_group=H * nv,
                          device=q.device)
        G, N = grp.n_groups, grp.n_seq
        q, k, v = (x.contiguous().view(TT, H, -1) for x in (q, k, v))
        gf = g.contiguous().view(TT, H, *g.shape[3:]) if g is not None else q
        f32 = dict(device=q.device, dtype=torch.float32)
        a = q
        if gate == 2:
            a = torch.empty(TT, H, bt, **f32)
            kern.gla_intra_fwd_kernel[(G, H)](q, k, gf, a, grp.bos, grp.eos, H=H, K=K, BT=bt,
                                              BKS=32)
        m = torch.empty(G, H, K, V, **f32)
        dl = torch.empty(G, H, K, **f32) if gate == 2 else torch.empty(G, H, **f32)
        kern.local_state_kernel[(nk * nv, G, H)](
            k, v, gf, m, dl, grp.bos, grp.eos, scale, H=H, K=K, V=V, BT=bt, BK=bk, BV=bv,
            GATE=gate, REVERSE=False, num_warps=4)
        hs = torch.empty(G, H, K, V, **f32)
        ht = torch.empty(N, H, K, V, **f32) if output_final_state else hs
        h0c = h0.contiguous() if h0 is not None else hs
        kern.group_scan_kernel[(nk * nv, N, H)](
            m, dl, h0c, hs, ht, grp.seq_g0, H=H, K=K, V=V, BK=bk, BV=bv, GATE=gate,
            REVERSE=False, HAS_H0=h0 is not None, STORE_FINAL=output_final_state)
        o = torch.empty(TT, H, V, device=q.device, dtype=v.dtype)
        kern.fwd_o_kernel[(nv, G, H)](
            q, k, v, gf, a, hs, o, grp.bos, grp.eos, scale, H=H, K=K, V=V, BT=bt, BK=bkf,
            BV=bv, GATE=gate, num_warps=_warps(bkf * bv, bt * bkf))
        ctx.save_for_backward(q, k, v, g, h0, a, hs, dl, ht if output_final_state else None)
        ctx.meta = (B, T, H, K, V, scale, gate, grp)
        return o.view(B, T, H, V), (ht if output_final_state else None)

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, h0, a, hs, dl, ht = ctx.saved_tensors
        B, T, H, K, V, scale, gate, grp = ctx.meta
        TT = B * T
        bt, bkf, bvf, bk, bv = _config(K, V, gate)
        nk, nv = triton.cdiv(K, bk), triton.cdiv(V, bv)
        G, N = grp.n_groups, grp.n_seq
        do = do.contiguous().view(TT, H, V)
        gf = g.contiguous().view(TT, H, *g.shape[3:]) if g is not None else q
        f32 = dict(device=q.device, dtype=torch.float32)
        dm = torch.empty(G, H, K, V, **f32)
        kern.local_state_kernel[(nk * nv, G, H)](
            q, do, gf, dm, dl, grp.bos, grp.eos, scale, H=H, K=K, V=V, BT=bt, BK=bk, BV=bv,
            GATE=gate, REVERSE=True, num_warps=4)
        he = torch.empty(G, H, K, V, **f32)
        dh0 = torch.empty(N, H, K, V, **f32)
        dhtc = dht.contiguous().float() if dht is not None else he
        kern.group_scan_kernel[(nk * nv, N, H)](
            dm, dl, dhtc, he, dh0, grp.seq_g0, H=H, K=K, V=V, BK=bk, BV=bv, GATE=gate,
            REVERSE=True, HAS_H0=dht is not None, STORE_FINAL=True)
        dqi = dki = q
        if gate == 2:
            dqi = torch.empty(TT, H, K, **f32)
            dki = torch.empty(TT, H, K, **f32)
            kern.gla_intra_bwd_kernel[(triton.cdiv(K, 32), G, H)](
                q, k, v, gf, do, dqi, dki, grp.bos, grp.eos, scale, H=H, K=K, V=V, BT=bt,
                BKS=32, BV=bvf, num_warps=4)
        need_g = gate != 0 and ctx.needs_input_grad[3]
        gdt = torch.float32 if need_g else q.dtype
        dq = torch.empty(TT, H, K, device=q.device, dtype=gdt)
        dk = torch.empty(TT, H, K, device=q.device, dtype=gdt)
        dv = torch.empty(TT, H, V, device=q.device, dtype=v.dtype)
        w = _warps(bk * bvf, bt * bvf)
        kern.bwd_dq_kernel[(nk, G, H)](
            k, v, gf, do, dqi, hs, dq, grp.bos, grp.eos, scale, H=H, K=K, V=V, BT=bt, BK=bk,
            BV=bvf, GATE=gate, num_warps=w)
        kern.bwd_dk_kernel[(nk, G, H)](
            q, v, gf, do, dki, he, dk, grp.bos, grp.eos, scale, H=H, K=K, V=V, BT=bt, BK=bk,
            BV=bvf, GATE=gate, num_warps=w)
        kern.bwd_dv_kernel[(nv, G, H)](
            q, k, gf, do, a, he, dv, grp.bos, grp.eos, scale, H=H, K=K, V=V, BT=bt, BK=bkf,
            BV=bv, GATE=gate, num_warps=_warps(bkf * bv, bt * bkf))
        dg = None
        if need_g:
            db = q.float() * dq - k.float() * dk
            if gate == 1:
                db = db.sum(-1)
            dg = seq_reverse_cumsum(db, grp, B, T)
            if dht is not None and ht is not None:
                tail = (dht.float() * ht).sum(-1)  # [N, H, K]
                if gate == 1:
                    tail = tail.sum(-1)
                lens = grp.cu[1:] - grp.cu[:-1]
                dg = dg + torch.repeat_interleave(tail, lens, dim=0, output_size=TT)
            dg = dg.view(g.shape).to(g.dtype)
        dq = dq.view(B, T, H, K).to(q.dtype)
        dk = dk.view(B, T, H, K).to(k.dtype)
        dh0 = dh0.to(h0.dtype) if h0 is not None else None
        return dq, dk, dv.view(B, T, H, V), dg, dh0, None, None, None, None


def nondelta_attn(q, k, v, g, gate: int, *, scale=None, initial_state=None,
                  output_final_state=False, cu_seqlens=None):
    """Shared entry of chunk_linear_attn (gate 0 or 1) and chunk_gla (gate 2); returns (o, ht)."""
    check_inputs(q, k, v, initial_state, cu_seqlens)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if q.shape[1] == 0:
        raise ValueError("T must be >= 1")
    return _NonDelta.apply(q, k, v, g, initial_state, float(scale), cu_seqlens, gate,
                           bool(output_final_state))
