"""Replicated data parallelism with the gradient sum overlapped with the backward (DDP).

The loss of every rank is already divided by the global token count, so the replicas'
gradients must be *summed*, not averaged: a comm hook replaces DDP's averaging all-reduce with
a plain SUM. With sequence parallelism the group is the flattened ``dp_sp`` mesh view (the
ranks of an SP group hold the same parameters and different tokens), so each gradient is
reduced once over every replica.
"""

# No `from __future__ import annotations`: DDP checks the hook's annotations as objects.

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["apply_ddp", "bf16_sum_allreduce_hook", "sum_allreduce_hook"]


def sum_allreduce_hook(
    group: dist.ProcessGroup, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """All-reduce one gradient bucket with SUM (DDP's default divides by the world size)."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def bf16_sum_allreduce_hook(
    group: dist.ProcessGroup, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """The same SUM with the bucket sent and summed in bf16 (half the bytes of fp32), then
    copied back into the bucket's own dtype."""
    buf = bucket.buffer()
    half = buf.to(torch.bfloat16)
    work = dist.all_reduce(half, group=group, async_op=True)

    def back(fut):
        return buf.copy_(fut.value()[0])

    return work.get_future().then(back)


def apply_ddp(
    model: nn.Module,
    group: dist.ProcessGroup,
    *,
    bucket_mb: int = 100,
    reduce_dtype: torch.dtype | None = None,
) -> DistributedDataParallel:
    """Wrap ``model`` for gradient summation over ``group``; ``model`` itself is unchanged
    (checkpoints and the loss keep using it directly). ``reduce_dtype``: None (the gradients'
    own dtype) or ``torch.bfloat16``."""
    if reduce_dtype not in (None, torch.bfloat16):
        raise ValueError(
            f"apply_ddp: reduce_dtype must be None or torch.bfloat16, not {reduce_dtype}"
        )
    device_ids = None
    p = next(model.parameters())
    if p.is_cuda:
        device_ids = [p.device.index]
    ddp = DistributedDataParallel(
        model,
        device_ids=device_ids,
        process_group=group,
        bucket_cap_mb=bucket_mb,
        gradient_as_bucket_view=True,
        init_sync=False,
    )
    hook = sum_allreduce_hook if reduce_dtype is None else bf16_sum_allreduce_hook
    ddp.register_comm_hook(group, hook)
    return ddp
