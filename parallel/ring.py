"""LASP-1: the ring baseline (for comparison with LASP-2 only).

The same affine pieces as LASP-2, but the state is passed rank to rank: rank ``r`` receives
``S_in`` from rank ``r - 1``, sends ``A_r ∘ S_in + M_r`` to rank ``r + 1``; backward sends
``dL/dS_in`` the other way. ``W - 1`` sequential hops per layer and direction, contiguous
layout only. The intra-slice op runs before the chain (it does not need ``S_in``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import parallel._sp_comm as comm
from parallel._sp_comm import global_rank, group_info
from parallel.lasp2 import (
    _apply,
    _apply_adjoint,
    _grad_A,
    affine_pieces,
    compute_dtype,
    cross_term,
    resolve_op,
)

__all__ = ["lasp1_linear_attn"]


def _send(x: torch.Tensor, peer: int, group) -> None:
    if not comm._SKIP_COMM:
        dist.send(x.contiguous(), dst=global_rank(group, peer), group=group)


def _recv(like: torch.Tensor, peer: int, group) -> torch.Tensor:
    out = torch.zeros_like(like)
    if not comm._SKIP_COMM:
        dist.recv(out, src=global_rank(group, peer), group=group)
    return out


class _RingStates(torch.autograd.Function):
    """(A, M) of this rank's slice -> S_in, by a ring of point-to-point sends."""

    @staticmethod
    def forward(ctx, M, A, group, kind: str):
        rank, world = group_info(group)
        s_in = _recv(M, rank - 1, group) if rank > 0 else torch.zeros_like(M)
        if rank < world - 1:
            _send(_apply(kind, A, s_in) + M, rank + 1, group)
        ctx.save_for_backward(A if A is not None else M.new_empty(0), s_in)
        ctx.meta = (group, kind, rank, world, A is not None)
        return s_in

    @staticmethod
    def backward(ctx, d_s_in):
        A, s_in = ctx.saved_tensors
        group, kind, rank, world, has_a = ctx.meta
        A = A if has_a else None
        U = _recv(s_in, rank + 1, group) if rank < world - 1 else torch.zeros_like(s_in)
        if rank > 0:
            _send(d_s_in + _apply_adjoint(kind, A, U), rank - 1, group)
        dA = _grad_A(kind, U, s_in)
        return U, dA, None, None


def lasp1_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    group: dist.ProcessGroup | None,
    scale: float | None = None,
    op=None,
) -> torch.Tensor:
    """Linear attention / scalar decay with the LASP-1 ring, contiguous layout.

    Args:
        q, k: ``[B, T_local, H, K]``; v: ``[B, T_local, H, V]``; g: ``[B, T_local, H]`` or None.
        group: the SP process group (None: the default group).
        scale: defaults to ``K ** -0.5``.
        op: the single-device op (default: the linear_attn chunk op).

    Returns:
        ``o`` ``[B, T_local, H, V]``.
    """
    if q.dim() != 4 or q.shape != k.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be "
            "[B, T_local, H, D] and agree"
        )
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    op = op or resolve_op("linear_attn")
    _, world = group_info(group)
    if world == 1:
        return op(q, k, v, g, scale=scale)[0]
    o_intra = op(q, k, v, g, scale=scale)[0]
    kind = "none" if g is None else "scalar"
    A, M, q_x = affine_pieces(kind, q, k, v, g, scale=scale)
    s_in = _RingStates.apply(M, A, group, kind)
    o_cross = cross_term(q_x, s_in, compute_dtype(q))
    return (o_intra.to(s_in.dtype) + o_cross).to(o_intra.dtype)
