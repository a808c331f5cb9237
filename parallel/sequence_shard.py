"""How a sequence is cut across the ranks of a sequence-parallel group.

Two layouts (shared by LASP-2, LASP-2H, the conv halo, the data loader and RoPE positions):

- ``"contiguous"``: the sequence is cut into ``W`` equal slices and rank ``r`` holds slice ``r``.
- ``"zigzag"``: the sequence is cut into ``2W`` equal slices and rank ``r`` holds slices ``r`` and
  ``2W - 1 - r``, concatenated in that order. Every rank then gets the same amount of causal
  softmax work (an early slice plus a late one).

A rank's local tensor is thus ``n`` ("slots", 1 or 2) equal slices of ``T_s`` tokens side by
side; slot ``i`` of rank ``r`` is global slice ``local_slices(r, W, layout)[i]``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "LAYOUTS",
    "check_layout",
    "slots_per_rank",
    "local_slices",
    "slice_owner",
    "shard_sequence",
    "merge_shards",
    "unshard_sequence",
    "shard_position_ids",
    "split_slots",
    "merge_slots",
]

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout: str) -> str:
    """Return ``layout`` or raise ``ValueError`` naming the argument."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def slots_per_rank(layout: str) -> int:
    """1 for contiguous, 2 for zigzag."""
    return 2 if check_layout(layout) == "zigzag" else 1


def local_slices(rank: int, world: int, layout: str) -> list[int]:
    """Global slice ids held by ``rank``, in local order."""
    if not 0 <= rank < world:
        raise ValueError(f"rank must lie in [0, {world}), got {rank}")
    if slots_per_rank(layout) == 1:
        return [rank]
    return [rank, 2 * world - 1 - rank]


def slice_owner(slice_id: int, world: int, layout: str) -> tuple[int, int]:
    """``(rank, slot)`` holding global slice ``slice_id``."""
    if slots_per_rank(layout) == 1:
        return slice_id, 0
    return (slice_id, 0) if slice_id < world else (2 * world - 1 - slice_id, 1)


def _slice_len(seq_len: int, world: int, layout: str, what: str) -> int:
    parts = world * slots_per_rank(layout)
    if seq_len % parts:
        raise ValueError(
            f"{what} = {seq_len} must be divisible by {parts} (world {world}, layout {layout!r})"
        )
    return seq_len // parts


def shard_sequence(
    x: torch.Tensor, *, dim: int, rank: int, world: int, layout: str
) -> torch.Tensor:
    """This rank's shard of a full sequence along ``dim`` (``T -> T / W``)."""
    ts = _slice_len(x.shape[dim], world, layout, f"x.shape[{dim}]")
    parts = [x.narrow(dim, j * ts, ts) for j in local_slices(rank, world, layout)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def merge_shards(shards: list[torch.Tensor], *, dim: int, layout: str) -> torch.Tensor:
    """Inverse of :func:`shard_sequence` given every rank's shard, in rank order."""
    world, n = len(shards), slots_per_rank(layout)
    ts = _slice_len(shards[0].shape[dim], 1, layout, f"shard.shape[{dim}]")
    pieces = []
    for j in range(world * n):
        r, slot = slice_owner(j, world, layout)
        pieces.append(shards[r].narrow(dim, slot * ts, ts))
    return torch.cat(pieces, dim=dim)


def unshard_sequence(
    x: torch.Tensor, *, dim: int, group: dist.ProcessGroup | None, layout: str
) -> torch.Tensor:
    """All-gather every rank's shard and reassemble the full sequence (tests, evaluation).

    Not differentiable; ``x`` must have the same shape on every rank.
    """
    world = dist.get_world_size(group)
    shards = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(shards, x.contiguous(), group=group)
    return merge_shards(shards, dim=dim, layout=layout)


def shard_position_ids(
    seq_len: int, *, rank: int, world: int, layout: str, device: torch.device | str | None = None
) -> torch.Tensor:
    """Global position ids ``[seq_len / W]`` (int64) of this rank's tokens, for RoPE."""
    return shard_sequence(
        torch.arange(seq_len, device=device), dim=0, rank=rank, world=world, layout=layout
    )


def split_slots(x: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, n * T_s, ...] -> [n * B, T_s, ...]``, slot-major (slot 0's batch first)."""
    if n == 1:
        return x
    return x.unflatten(1, (n, x.shape[1] // n)).transpose(0, 1).flatten(0, 1)


def merge_slots(x: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`split_slots`: ``[n * B, T_s, ...] -> [B, n * T_s, ...]``."""
    if n == 1:
        return x
    return x.unflatten(0, (n, x.shape[0] // n)).transpose(0, 1).flatten(1, 2)
