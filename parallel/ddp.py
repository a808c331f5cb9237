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

__all__ = ["apply_ddp", "sum_allreduce_hook"]


def sum_allreduce_hook(
    group: dist.ProcessGroup, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """All-reduce one gradient bucket with SUM (DDP's default divides by the world size)."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def apply_ddp(
    model: nn.Module, group: dist.ProcessGroup, *, bucket_mb: int = 100
) -> DistributedDataParallel:
    """Wrap ``model`` for gradient summation over ``group``; ``model`` itself is unchanged
    (checkpoints and the loss keep using it directly)."""
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
    ddp.register_comm_hook(group, sum_allreduce_hook)
    return ddp
