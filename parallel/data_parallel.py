"""Data parallelism: gradient reduction over the replicas of each parameter (all-reduce, or
FSDP2 sharding), and a global gradient-norm clip that also spans pipeline stages.

With sequence parallelism the ranks of one SP group hold the same parameters but different
tokens, so every parameter's gradient is summed over the flattened ``dp_sp`` mesh view (once,
never twice). The loss is a sum divided by the global token count, so a SUM reduction gives
exactly the single-device gradient. FSDP2 shards over that same ``dp_sp`` view, with its
gradient divide factor set to 1 (a sum, not FSDP's default mean).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

__all__ = [
    "allreduce_gradients",
    "apply_fsdp",
    "clip_grad_norm_",
    "exclude_from_grad_norm",
    "reduce_dtype_of",
]

_NOT_IN_NORM = "_linscale_not_in_grad_norm"
_REDUCE_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def reduce_dtype_of(name: str) -> torch.dtype | None:
    """``parallel.grad_reduce_dtype`` as a dtype: None for fp32 (no cast), bf16 for bf16."""
    if name not in _REDUCE_DTYPES:
        raise ValueError(
            f"parallel.grad_reduce_dtype: {name!r} is not one of {sorted(_REDUCE_DTYPES)}"
        )
    return _REDUCE_DTYPES[name]


def allreduce_gradients(
    params: list[nn.Parameter],
    group: dist.ProcessGroup | None,
    *,
    bucket_mb: float = 64.0,
    reduce_dtype: torch.dtype | None = None,
) -> None:
    """Sum ``p.grad`` over ``group`` in flat buckets (a parameter without grad gets zeros).

    ``reduce_dtype`` (e.g. bf16): each bucket travels and is summed in that dtype (half the
    bytes of fp32), then is copied back into the fp32 gradients."""
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
        if reduce_dtype is not None and reduce_dtype != flat.dtype:
            flat = flat.to(reduce_dtype)
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


def apply_fsdp(
    model: nn.Module,
    mesh,
    *,
    reshard_after_forward: bool = True,
    reduce_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Shard ``model`` (a LinearLlama or a pipeline stage of one) with FSDP2 over ``mesh``.

    Each block in ``model.layers`` is its own FSDP unit, the rest (embedding, norm, head) the
    root's. Gradients are summed over the mesh by the reduce-scatter (divide factor 1), so the
    trainer must not all-reduce them again. Parameters become DTensors sharded on dim 0.

    Args:
        mesh: the 1-D DeviceMesh of the replicas (``ParallelDims.submesh("dp_sp")``).
        reshard_after_forward: free the gathered blocks after forward (ZeRO-3: gathered again
            for the backward); False keeps them from forward to backward (one gather per step;
            with PP, one per step instead of one per microbatch).
        reduce_dtype: dtype of the gradient reduce-scatter (None: the parameters' fp32).
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(reduce_dtype=reduce_dtype)
    for block in model.layers.values():
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp)
    # The root keeps its parameters (embedding, norm, head) gathered from forward to backward:
    # the loss uses the head weight after the forward returns.
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=mp)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # Gloo has no PREMUL_SUM: reduce with SUM and scale separately (by 1).
            if hasattr(module, "set_force_sum_reduction_for_comms"):
                module.set_force_sum_reduction_for_comms(True)
    return model


def exclude_from_grad_norm(param: nn.Parameter) -> nn.Parameter:
    """Mark ``param`` as a copy whose gradient is already counted elsewhere in the global norm
    (the last pipeline stage's copy of a tied embedding); it is still clipped."""
    setattr(param, _NOT_IN_NORM, True)
    return param


def _sq_sum(grads: list[torch.Tensor], device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum()


def clip_grad_norm_(
    params: list[nn.Parameter], max_norm: float, *, pp_group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Clip to a global L2 norm; the norm is summed over pipeline stages when ``pp_group``.

    Plain gradients are replicas (already reduced over ``dp_sp``) and count as they are;
    DTensor gradients (FSDP2 shards) have their squared sums added over their mesh; gradients of
    parameters marked by :func:`exclude_from_grad_norm` are clipped but not counted.

    Returns the (pre-clip) total norm as an fp32 scalar tensor. ``max_norm <= 0`` only measures.
    """
    device = params[0].device if params else "cpu"
    plain, sharded = [], {}
    grads = []
    for p in params:
        g = p.grad
        if g is None:
            continue
        local = g.to_local() if hasattr(g, "to_local") else g
        grads.append(local)
        if getattr(p, _NOT_IN_NORM, False):
            continue
        if local is g:
            plain.append(g)
        else:
            sharded.setdefault(id(g.device_mesh), (g.device_mesh, []))[1].append(local)
    total_sq = _sq_sum(plain, device)
    for mesh, locals_ in sharded.values():
        part = _sq_sum(locals_, device)
        if mesh.size() > 1:
            if mesh.ndim != 1:
                raise NotImplementedError("clip_grad_norm_ handles 1-D FSDP meshes only")
            dist.all_reduce(part, group=mesh.get_group())
        total_sq = total_sq + part
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(total_sq, group=pp_group)
    total = total_sq.sqrt()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
    return total
