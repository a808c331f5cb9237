"""Chunked pure-torch linear-attention recurrences (the CPU path and the kernels' oracle).

Same functions as :mod:`models.ops.naive` (see shared/DESIGN.md for the recurrences), computed
chunk by chunk (``CHUNK = 64`` tokens): everything inside a chunk is batched matrix products over
all chunks at once, and only the chunk-boundary states are scanned sequentially. Plain torch
ops, so autograd differentiates through every input, ``initial_state`` included, and accepts a
gradient on the final state.

Numerics: internal math and states in fp32 (fp64 for fp64 inputs), ``o`` in v's dtype. Every
exponent of a cumulative log gate is formed as a difference ``b_i - b_j`` with ``i >= j`` before
``exp``, so strongly negative gates underflow to zero instead of overflowing; the per-channel
gate (GLA) needs 8-token sub-chunks for that (see :func:`_intra_vector`).

Ragged lengths are zero-padded to a chunk multiple at the end (zero k, v, beta and log gate leave
the state unchanged); ``cu_seqlens`` documents are packed into a padded ``[N, T_max]`` batch.
"""

from __future__ import annotations

import torch

# The per-token forms (the fp64 ground truth) live in naive.py; they are offered here too so
# that one module holds both pure-torch forms of every op.
from models.ops.naive import (
    naive_gated_delta_rule,
    naive_gla,
    naive_linear_attn,
    naive_recurrence,
)

__all__ = [
    "CHUNK",
    "chunk_gated_delta_rule",
    "chunk_gla",
    "chunk_linear_attn",
    "naive_gated_delta_rule",
    "naive_gla",
    "naive_linear_attn",
    "naive_recurrence",
]

CHUNK = 64
_SUB = 8  # sub-chunk of the per-channel-gate path


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _pack(xs, cu_seqlens, T):
    """Turn ``[1, T, ...]`` tensors into ``[N, T_pad, ...]`` per-document tensors (zero padded)."""
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    t_max = int(lens.max().item()) if lens.numel() else 0
    t_pad = max(CHUNK, -(-t_max // CHUNK) * CHUNK)
    pos = torch.arange(t_pad, device=cu_seqlens.device)
    valid = pos[None, :] < lens[:, None]  # [N, T_pad]
    idx = (cu_seqlens[:-1, None] + pos[None, :]).clamp(max=max(T - 1, 0))
    out = []
    for x in xs:
        if x is None:
            out.append(None)
            continue
        y = x[0][idx]  # [N, T_pad, ...]
        m = valid.view(valid.shape + (1,) * (y.dim() - 2))
        out.append(torch.where(m, y, torch.zeros((), dtype=y.dtype, device=y.device)))
    return out, valid


def _pad_time(xs, T):
    """Zero-pad ``[B, T, ...]`` tensors to a multiple of CHUNK along T."""
    t_pad = max(CHUNK, -(-T // CHUNK) * CHUNK)
    out = []
    for x in xs:
        if x is None or t_pad == T:
            out.append(x)
            continue
        pad = x.new_zeros((x.shape[0], t_pad - T) + tuple(x.shape[2:]))
        out.append(torch.cat([x, pad], 1))
    return out


def _to_chunks(x, cd):
    """``[B, T, H, *D]`` -> ``[B, H, NC, C, *D]`` in the compute dtype."""
    if x is None:
        return None
    B, T, H = x.shape[:3]
    y = x.to(cd).reshape(B, T // CHUNK, CHUNK, H, *x.shape[3:])
    return y.movedim(3, 1)


def _from_chunks(x):
    """``[B, H, NC, C, D]`` -> ``[B, T, H, D]``."""
    B, H, NC, C, D = x.shape
    return x.movedim(1, 3).reshape(B, NC * C, H, D)


def _causal(C, device, strict=False):
    i = torch.arange(C, device=device)
    return (i[:, None] > i[None, :]) if strict else (i[:, None] >= i[None, :])


def _masked_exp(diff, mask):
    """exp(diff) where mask else 0, never evaluating exp of a masked (possibly huge) entry."""
    return torch.exp(torch.where(mask, diff, torch.full_like(diff, float("-inf"))))


def _intra_vector(q, k, b):
    """Causal intra-chunk scores, per-channel decay: ``A_ij = sum_k q_ik k_jk exp(b_ik - b_jk)``.

    q, k, b ``[B, H, NC, C, K]`` (b the inclusive in-chunk cumulative log gate); returns
    ``[B, H, NC, C, C]``. Off-diagonal 8-blocks factor through a reference point ``r_I`` (the
    cumulative gate just before sub-chunk I) so that both factors have exponents <= 0; the
    diagonal blocks use the full [S, S, K] product.
    """
    *lead, C, K = q.shape
    ns = C // _SUB
    qs, ks, bs = (x.reshape(*lead, ns, _SUB, K) for x in (q, k, b))
    mask = _causal(_SUB, q.device)
    e = _masked_exp(bs[..., :, None, :] - bs[..., None, :, :], mask[..., None])
    a_diag = (qs[..., :, None, :] * ks[..., None, :, :] * e).sum(-1)
    r = torch.cat([torch.zeros_like(bs[..., :1, -1, :]), bs[..., :-1, -1, :]], -2)  # [.., ns, K]
    qg = qs * torch.exp(bs - r[..., :, None, :])
    ex = r[..., :, None, None, :] - bs[..., None, :, :, :]  # [.., I, J, S, K]
    kg = ks[..., None, :, :, :] * torch.exp(ex.clamp(max=0))
    a_off = torch.einsum("...Iik,...IJjk->...IiJj", qg, kg)
    blk = torch.arange(ns, device=q.device)
    lower = (blk[:, None] > blk[None, :]).to(q.dtype)  # J < I
    eye = torch.eye(ns, dtype=q.dtype, device=q.device)
    a = a_off * lower[:, None, :, None] + a_diag[..., :, :, None, :] * eye[:, None, :, None]
    return a.reshape(*lead, C, C)


def _decay_chunked(q, k, v, gate, scale, h0):
    """Non-delta variants on chunked tensors.

    q, k ``[B, H, NC, C, K]``, v ``[B, H, NC, C, V]``, gate None | ``[B, H, NC, C]`` |
    ``[B, H, NC, C, K]`` (log), h0 ``[B, H, K, V]``. Returns o (chunked) and the final state.
    """
    C = q.shape[-2]
    mask = _causal(C, q.device)
    if gate is None:
        a = (q @ k.transpose(-1, -2)).masked_fill(~mask, 0)
        q_in, k_in, last = q, k, None
    else:
        b = gate.cumsum(3)
        if gate.dim() == 5:
            a = _intra_vector(q, k, b)
            bl = b[..., -1:, :]  # [B, H, NC, 1, K]
            q_in, k_in = q * b.exp(), k * (bl - b).exp()
            last = bl.squeeze(-2)[..., None]  # [B, H, NC, K, 1]
        else:
            a = (q @ k.transpose(-1, -2)) * _masked_exp(b[..., :, None] - b[..., None, :], mask)
            bl = b[..., -1:]
            q_in, k_in = q * b.exp()[..., None], k * (bl - b).exp()[..., None]
            last = bl[..., None]  # [B, H, NC, 1, 1]
    o = a @ v
    m = k_in.transpose(-1, -2) @ v  # [B, H, NC, K, V] chunk-local state contributions
    dec = None if last is None else last.exp()
    h, starts = h0, []
    for n in range(q.shape[2]):
        starts.append(h)
        h = (h if dec is None else dec[:, :, n] * h) + m[:, :, n]
    o = o + q_in @ torch.stack(starts, 2)
    return o * scale, h


def _delta_chunked(q, k, v, g, beta, scale, h0):
    """Gated delta rule on chunked tensors via the WY/UT transform.

    Within a chunk, with ``G_i = exp(b_i)`` and ``delta_i = beta_i (v_i - G_i k_i S0 -
    sum_{j<i} G_i/G_j (k_i.k_j) delta_j)``, the pseudo-values solve the unit lower-triangular
    system ``(I + L) delta = beta (V - G K S0)``, ``L_ij = beta_i G_i/G_j k_i.k_j`` (j < i). So
    ``delta = U - W S0`` with ``U = (I+L)^-1 beta V``, ``W = (I+L)^-1 beta G K`` computed for
    all chunks at once; the scan then only does three products per chunk:
    ``o = scale (G q S0 + tril(q k^T G_i/G_j) delta)``, ``S = G_C S0 + (G_C/G_j k)^T delta``.
    """
    C = q.shape[-2]
    b = torch.zeros_like(beta) if g is None else g.cumsum(3)
    gam = b.exp()
    mask = _causal(C, q.device)
    dmat = _masked_exp(b[..., :, None] - b[..., None, :], mask)  # G_i / G_j, j <= i
    strict = _causal(C, q.device, strict=True)
    lmat = (k @ k.transpose(-1, -2)) * dmat * beta[..., None]
    lmat = lmat.masked_fill(~strict, 0)
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    rhs = torch.cat([beta[..., None] * v, (beta * gam)[..., None] * k], -1)
    sol = torch.linalg.solve_triangular(eye + lmat, rhs, upper=False, unitriangular=True)
    u, w = sol.split([v.shape[-1], k.shape[-1]], -1)
    qk = (q @ k.transpose(-1, -2)) * dmat
    qg = q * gam[..., None]
    bl = b[..., -1:]
    kd = k * (bl - b).exp()[..., None]
    dec = bl.exp()[..., None]  # [B, H, NC, 1, 1]
    h, outs = h0, []
    for n in range(q.shape[2]):
        delta = u[:, :, n] - w[:, :, n] @ h
        outs.append(qg[:, :, n] @ h + qk[:, :, n] @ delta)
        h = dec[:, :, n] * h + kd[:, :, n].transpose(-1, -2) @ delta
    return torch.stack(outs, 2) * scale, h


def _run(q, k, v, g, gk, beta, scale, initial_state, output_final_state, cu_seqlens):
    B, T, H, K = q.shape
    V = v.shape[-1]
    if scale is None:
        scale = K**-0.5
    cd = _compute_dtype(q)
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens needs B == 1, got B = {B}")
        (q, k, v, g, gk, beta), valid = _pack((q, k, v, g, gk, beta), cu_seqlens.long(), T)
    else:
        q, k, v, g, gk, beta = _pad_time((q, k, v, g, gk, beta), T)
        valid = None
    n_seq = q.shape[0]
    if initial_state is None:
        h0 = torch.zeros(n_seq, H, K, V, dtype=cd, device=q.device)
    else:
        if initial_state.shape != (n_seq, H, K, V):
            raise ValueError(
                f"initial_state must be {(n_seq, H, K, V)}, got {tuple(initial_state.shape)}"
            )
        h0 = initial_state.to(cd)
    qc, kc, vc = (_to_chunks(x, cd) for x in (q, k, v))
    if beta is not None:
        o, ht = _delta_chunked(qc, kc, vc, _to_chunks(g, cd), _to_chunks(beta, cd), scale, h0)
    else:
        gate = _to_chunks(gk if gk is not None else g, cd)
        o, ht = _decay_chunked(qc, kc, vc, gate, scale, h0)
    o = _from_chunks(o)
    o = o[valid][None] if valid is not None else o[:, :T]
    return o.to(v.dtype), (ht if output_final_state else None)


def chunk_linear_attn(
    q, k, v, g=None, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None
):
    """Linear attention, no decay (``g is None``) or scalar decay.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; g: ``[B, T, H]`` log decay (<= 0) or None.
        scale: defaults to ``K ** -0.5``.
        initial_state: ``[B, H, K, V]`` (``[N, H, K, V]`` with ``cu_seqlens``) or None.
        output_final_state: also return the final state.
        cu_seqlens: ``[N + 1]`` int cumulative document lengths, ``B == 1``.

    Returns:
        ``(o, ht)``: o ``[B, T, H, V]`` in v's dtype; ht ``[B or N, H, K, V]`` fp32 or None.
    """
    return _run(q, k, v, g, None, None, scale, initial_state, output_final_state, cu_seqlens)


def chunk_gla(
    q, k, v, gk, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None
):
    """Gated linear attention with per-key-channel log decay ``gk`` ``[B, T, H, K]``.

    Other arguments and the return value as :func:`chunk_linear_attn`.
    """
    return _run(q, k, v, None, gk, None, scale, initial_state, output_final_state, cu_seqlens)


def chunk_gated_delta_rule(
    q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None
):
    """Gated delta rule: ``S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t``.

    g ``[B, T, H]`` log decay or None (plain delta rule), beta ``[B, T, H]``; k is used as
    given (not normalised). Other arguments and the return value as :func:`chunk_linear_attn`.
    """
    return _run(q, k, v, g, None, beta, scale, initial_state, output_final_state, cu_seqlens)
