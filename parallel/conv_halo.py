"""Causal short convolutions under sequence parallelism: a halo exchange of ``W - 1`` tokens.

A causal depthwise conv of width ``W`` at the start of a slice needs the last ``W - 1`` tokens
of the slice before it, which another rank holds (under zigzag, the two local slices have
different predecessors, one of them possibly this rank's own first slice). Every rank
all-gathers the tails of its slices (``[W - 1, C]`` each, independent of T) and takes its
predecessors'; backward all-gathers the halo gradients and each rank adds its successors'
into its tails. The conv then runs on ``[halo | slice]`` and drops the first ``W - 1`` outputs,
which equals the single-device conv exactly (the first slice's halo is the zero padding).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from parallel._sp_comm import all_gather_async, group_info
from parallel.sequence_shard import (
    check_layout,
    local_slices,
    merge_slots,
    slice_owner,
    slots_per_rank,
    split_slots,
)

__all__ = ["exchange_halo", "sp_causal_conv"]


class _HaloExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, halo: int, group, layout: str):
        rank, world = group_info(group)
        n = slots_per_rank(layout)
        xs = x.unflatten(1, (n, x.shape[1] // n))  # [B, n, Ts, C]
        gathered = all_gather_async(xs[:, :, -halo:], group).wait()  # [W, B, n, halo, C]
        out = []
        for j in local_slices(rank, world, layout):
            if j == 0:
                out.append(torch.zeros_like(gathered[0, :, 0]))
            else:
                r, slot = slice_owner(j - 1, world, layout)
                out.append(gathered[r, :, slot])
        ctx.meta = (halo, group, layout, rank, world, x.shape)
        return torch.stack(out, dim=1)  # [B, n, halo, C]

    @staticmethod
    def backward(ctx, d_halo):
        halo, group, layout, rank, world, shape = ctx.meta
        n = slots_per_rank(layout)
        gathered = all_gather_async(d_halo, group).wait()  # [W, B, n, halo, C]
        dx = d_halo.new_zeros(shape).unflatten(1, (n, shape[1] // n))
        for i, j in enumerate(local_slices(rank, world, layout)):
            if j + 1 < world * n:
                r, slot = slice_owner(j + 1, world, layout)
                dx[:, i, -halo:] += gathered[r, :, slot]
        return dx.flatten(1, 2), None, None, None


def exchange_halo(
    x: torch.Tensor, halo: int, *, group: dist.ProcessGroup | None, layout: str
) -> torch.Tensor:
    """The ``halo`` tokens before each local slice: x ``[B, T_local, C]`` -> ``[B, n, halo, C]``
    (zeros before the sequence start). Differentiable; one AllGather each way."""
    check_layout(layout)
    n = slots_per_rank(layout)
    if x.dim() != 3 or x.shape[1] % n:
        raise ValueError(
            f"x must be [B, T_local, C] with T_local divisible by {n}, got {tuple(x.shape)}"
        )
    if not 0 < halo <= x.shape[1] // n:
        raise ValueError(f"halo = {halo} must lie in [1, slice length {x.shape[1] // n}]")
    return _HaloExchange.apply(x, halo, group, layout)


def sp_causal_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    group: dist.ProcessGroup | None,
    layout: str = "contiguous",
    conv_op: Callable[..., torch.Tensor],
) -> torch.Tensor:
    """``conv_op(x, weight, bias)`` (causal depthwise, zero left padding) on this rank's shard.

    x ``[B, T_local, C]``, weight ``[C, W]``, bias ``[C]`` or None -> ``[B, T_local, C]``, equal to
    this shard of ``conv_op`` on the whole sequence.
    """
    width = weight.shape[-1]
    _, world = group_info(group)
    if world == 1 or width == 1:
        return conv_op(x, weight, bias)
    n = slots_per_rank(layout)
    halo = exchange_halo(x, width - 1, group=group, layout=layout)  # [B, n, W-1, C]
    xs = torch.cat([halo.transpose(0, 1).flatten(0, 1), split_slots(x, n)], dim=1)
    return merge_slots(conv_op(xs, weight, bias)[:, width - 1 :], n)
