"""Data parallelism: gradient reduction over the replicas of each parameter, and a global
gradient-norm clip that also spans pipeline stages.

With sequence parallelism the ranks of one SP group hold the same parameters but different
tokens, so every parameter's gradient is summed over the flattened ``dp_sp`` mesh view (once,
never twice). The loss is a sum divided by the global token count, so a SUM all-reduce gives
exactly the single-device gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

__all__ = ["allreduce_gradients", "clip_grad_norm_"]


def allreduce_gradients(params: list[nn.Parameter], group: dist.ProcessGroup | None,
                        *, bucket_mb: float = 64.0) -> None:
    """Sum ``p.grad`` over ``group`` in flat buckets (a parameter without grad gets zeros)."""
    if group is None or dist.get_world_size(group) == 1:
        return
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    limit = int(bucket_mb * 2**20)
    bucket: list[torch.Tensor] = []
    size = 0

    def flush():
        if not bucket:
            return
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat, group=group)
        for g, r in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            g.copy_(r)
        bucket.clear()

    for g in grads:
        bucket.append(g)
        size += g.numel() * g.element_size()
        if size >= limit:
            flush()
            size = 0
    flush()


def clip_grad_norm_(params: list[nn.Parameter], max_norm: float, *,
                    pp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Clip to a global L2 norm; the norm is summed over pipeline stages when ``pp_group``.

    Returns the (pre-clip) total norm as an fp32 scalar tensor. ``max_norm <= 0`` only measures.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        local = torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum()
    else:
        local = torch.zeros((), dtype=torch.float32,
                            device=params[0].device if params else "cpu")
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(local, group=pp_group)
    total = local.sqrt()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
    return total
