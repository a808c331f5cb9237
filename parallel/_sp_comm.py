"""Collectives of the sequence-parallel ops, in one place so that they can be counted and timed.

Every SP op issues its collectives through these helpers. ``no_comm()`` turns them into local
copies of the right shape (wrong values, same compute), which is how the scaling benchmark
measures the exposed communication time: step time minus the same step without collectives.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "group_info",
    "global_rank",
    "Pending",
    "all_gather_async",
    "reduce_scatter_async",
    "no_comm",
]

_SKIP_COMM = False
# torch >= 2.13 renames the single-tensor collectives (the old names warn); torch 2.11 on the
# GPU machines has only the old ones.
ALL_GATHER = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
REDUCE_SCATTER = (
    "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") else "reduce_scatter_tensor"
)


def group_info(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """``(rank, world)`` of this process in ``group`` (``(0, 1)`` without torch.distributed)."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def global_rank(group: dist.ProcessGroup | None, rank: int) -> int:
    """The global rank of ``rank`` of ``group`` (None: the default group)."""
    return dist.get_global_rank(group if group is not None else dist.group.WORLD, rank)


@contextlib.contextmanager
def no_comm() -> Iterator[None]:
    """Within this context the SP collectives are skipped (benchmarks only: results are wrong)."""
    global _SKIP_COMM
    prev, _SKIP_COMM = _SKIP_COMM, True
    try:
        yield
    finally:
        _SKIP_COMM = prev


@dataclass
class Pending:
    """A collective in flight: ``wait()`` returns its output buffer."""

    out: torch.Tensor
    work: dist.Work | None = None

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.out


def all_gather_async(x: torch.Tensor, group: dist.ProcessGroup | None) -> Pending:
    """Start gathering ``x`` from every rank; the result is ``[W, *x.shape]`` in rank order."""
    _, world = group_info(group)
    x = x.contiguous()
    out = x.new_empty((world, *x.shape))
    if _SKIP_COMM or world == 1:
        out.copy_(x.expand_as(out))
        return Pending(out)
    # Flat buffers: backends disagree on how they read multi-dimensional ones.
    work = getattr(dist, ALL_GATHER)(out.view(-1), x.view(-1), group=group, async_op=True)
    return Pending(out, work)


def reduce_scatter_async(x: torch.Tensor, group: dist.ProcessGroup | None) -> Pending:
    """Start summing ``x`` ``[W, *shape]`` over ranks; rank ``r`` receives the sum of ``x[r]``."""
    rank, world = group_info(group)
    x = x.contiguous()
    if x.shape[0] != world:
        raise ValueError(f"x.shape[0] = {x.shape[0]} must equal the group size {world}")
    out = x.new_empty(x.shape[1:])
    if _SKIP_COMM or world == 1:
        out.copy_(x[rank])
        return Pending(out)
    work = getattr(dist, REDUCE_SCATTER)(
        out.view(-1), x.view(-1), op=dist.ReduceOp.SUM, group=group, async_op=True
    )
    return Pending(out, work)
