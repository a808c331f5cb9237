"""Gated delta rule on the GPU: torch for the chunk-parallel WY algebra, Triton for the scan.

Everything that is independent per chunk (the in-chunk cumulative gate, the unit
lower-triangular solve of the WY/UT transform, the causal score matrices) is batched torch
work (cuBLAS / batched triangular solves) over all chunks at once and differentiated by
autograd. The sequential part, the chunk-state scan with its KxK transitions, is the Triton
:class:`_DeltaScan` (forward and reverse scans in :mod:`.delta_kernels`); its backward
recomputes the chunk-start states instead of keeping them from the forward.
"""

from __future__ import annotations

import torch
import triton

from models.ops import reference as ref
from models.ops.triton_ops import delta_kernels as kern
from models.ops.triton_ops.common import check_inputs

__all__ = ["chunk_gated_delta_rule", "unit_lower_inverse"]


def _bv(S: int, V: int, device: torch.device) -> int:
    # The scan is sequential over chunks: with few sequences, narrower V tiles give more programs.
    sms = 4
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    return 32 if S * triton.cdiv(V, 32) >= 2 * sms else 16


def _bk(K: int) -> int:
    return max(16, triton.next_power_of_2(K))


class _DeltaScan(torch.autograd.Function):
    """(u, w, qg, p, kd, gam, h0) ``[S, NC, C, *]`` -> (o ``[S, NC, C, V]``, ht ``[S, K, V]``)."""

    @staticmethod
    def forward(ctx, u, w, qg, p, kd, gam, h0):
        S, NC, C, V = u.shape
        K = w.shape[-1]
        o = torch.empty_like(u)
        ht = u.new_empty(S, K, V)
        bv = _bv(S, V, u.device)
        grid = (triton.cdiv(V, bv), S)
        kern.delta_scan_fwd_kernel[grid](
            u,
            w,
            qg,
            p,
            kd,
            gam,
            h0,
            o,
            ht,
            u,
            u,
            NC,
            C=C,
            K=K,
            V=V,
            BK=_bk(K),
            BV=bv,
            HAS_H0=True,
            STORE_O=True,
            STORE_FINAL=True,
            STORE_STATES=False,
            num_warps=4 if K <= 128 else 8,
            num_stages=1,
        )
        ctx.save_for_backward(u, w, qg, p, kd, gam, h0)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        u, w, qg, p, kd, gam, h0 = ctx.saved_tensors
        S, NC, C, V = u.shape
        K = w.shape[-1]
        nw = 4 if K <= 128 else 8
        bv = _bv(S, V, u.device)
        grid = (triton.cdiv(V, bv), S)
        hc = u.new_empty(S, NC, K, V)
        delta = torch.empty_like(u)
        kern.delta_scan_fwd_kernel[grid](
            u,
            w,
            qg,
            p,
            kd,
            gam,
            h0,
            u,
            u,
            hc,
            delta,
            NC,
            C=C,
            K=K,
            V=V,
            BK=_bk(K),
            BV=bv,
            HAS_H0=True,
            STORE_O=False,
            STORE_FINAL=False,
            STORE_STATES=True,
            num_warps=nw,
            num_stages=1,
        )
        do = do.contiguous().float() if do is not None else torch.zeros_like(u)
        dd = torch.empty_like(u)
        dhc = torch.empty_like(hc)
        dh0 = torch.empty_like(h0)
        dhtc = dht.contiguous().float() if dht is not None else h0
        kern.delta_scan_bwd_kernel[grid](
            w,
            qg,
            p,
            kd,
            gam,
            do,
            dhtc,
            dd,
            dhc,
            dh0,
            NC,
            C=C,
            K=K,
            V=V,
            BK=_bk(K),
            BV=bv,
            HAS_DHT=dht is not None,
            num_warps=nw,
            num_stages=1,
        )
        hct = hc.transpose(-1, -2)
        dqg = do @ hct
        dp = (do @ delta.transpose(-1, -2)).tril()
        dkd = delta @ dhc.transpose(-1, -2)
        dgam = (hc * dhc).sum((-1, -2))
        dw = -(dd @ hct)
        return dd, dw, dqg, dp, dkd, dgam, dh0


def unit_lower_inverse(lmat: torch.Tensor, block: int = 16) -> torch.Tensor:
    """``(I + L)^-1`` for strictly lower-triangular ``L`` ``[..., C, C]`` (C a multiple of 16).

    Batched triangular solves are slow on the GPU for many small systems, so: forward
    substitution row by row inside each 16-block (as stable as a triangular solve, 16 steps),
    then the blocks below the diagonal from ``T_IJ = -T_II sum_{J<=M<I} L_IM T_MJ`` (small
    batched matmuls). Plain torch ops, so autograd differentiates it.
    """
    C = lmat.shape[-1]
    nb = C // block
    lb = lmat.unflatten(-2, (nb, block)).unflatten(-1, (nb, block))  # [..., I, i, J, j]
    diag = torch.stack([lb[..., i, :, i, :] for i in range(nb)], -3)  # [..., nb, b, b]
    eye = torch.eye(block, dtype=lmat.dtype, device=lmat.device)
    rows = [eye[0].expand(diag.shape[:-2] + (block,))]
    for i in range(1, block):
        prev = torch.stack(rows, -2)  # [..., nb, i, b]
        rows.append(eye[i] - (diag[..., i : i + 1, :i] @ prev).squeeze(-2))
    tdiag = torch.stack(rows, -2)  # [..., nb, b, b]
    t = [[None] * nb for _ in range(nb)]
    for i in range(nb):
        t[i][i] = tdiag[..., i, :, :]
    for i in range(1, nb):
        for j in range(i - 1, -1, -1):
            acc = sum(lb[..., i, :, m, :] @ t[m][j] for m in range(j, i))
            t[i][j] = -(t[i][i] @ acc)
    zero = torch.zeros_like(t[0][0])
    return torch.cat(
        [torch.cat([t[i][j] if j <= i else zero for j in range(nb)], -1) for i in range(nb)], -2
    )


def chunk_gated_delta_rule(
    q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None
):
    """Gated delta rule; same signature and return value as
    :func:`models.ops.reference.chunk_gated_delta_rule`."""
    check_inputs(q, k, v, initial_state, cu_seqlens, g=g, beta=beta)
    B, T, H, K = q.shape
    V = v.shape[-1]
    if scale is None:
        scale = K**-0.5
    cd = torch.float32
    if cu_seqlens is not None:
        (q, k, v, g, beta), valid = ref._pack((q, k, v, g, beta), cu_seqlens.long(), T)
    else:
        q, k, v, g, beta = ref._pad_time((q, k, v, g, beta), T)
        valid = None
    n_seq = q.shape[0]
    if initial_state is None:
        h0 = torch.zeros(n_seq, H, K, V, dtype=cd, device=q.device)
    else:
        h0 = initial_state.to(cd)
    qc, kc, vc = (ref._to_chunks(x, cd) for x in (q, k, v))
    bc = ref._to_chunks(beta, cd)
    C = qc.shape[-2]
    b = torch.zeros_like(bc) if g is None else ref._to_chunks(g, cd).cumsum(3)
    gam = b.exp()
    mask = ref._causal(C, q.device)
    dmat = ref._masked_exp(b[..., :, None] - b[..., None, :], mask)
    lmat = ((kc @ kc.transpose(-1, -2)) * dmat * bc[..., None]).tril(-1)
    rhs = torch.cat([bc[..., None] * vc, (bc * gam)[..., None] * kc], -1)
    u, w = (unit_lower_inverse(lmat) @ rhs).split([V, K], -1)
    p = (qc @ kc.transpose(-1, -2)) * dmat * scale
    qg = qc * (gam * scale)[..., None]
    bl = b[..., -1:]
    kd = kc * (bl - b).exp()[..., None]
    dec = bl.exp()[..., 0]  # [N, H, NC]
    NC = qc.shape[2]

    def flat(x):
        return x.reshape(n_seq * H, NC, *x.shape[3:]).contiguous()

    o, ht = _DeltaScan.apply(
        flat(u),
        flat(w),
        flat(qg),
        flat(p),
        flat(kd),
        flat(dec),
        h0.reshape(n_seq * H, K, V).contiguous(),
    )
    o = ref._from_chunks(o.view(n_seq, H, NC, C, V))
    o = o[valid][None] if valid is not None else o[:, :T]
    ht = ht.view(n_seq, H, K, V) if output_final_state else None
    return o.to(v.dtype), ht
