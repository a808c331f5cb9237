"""Apply the parallelisms to a LinearLlama from outside, in a fixed order:
sequence parallelism (swap the token-mixer hooks), activation checkpointing, torch.compile of
each block (when asked for), then data parallelism (FSDP2 when asked for; otherwise replicated
parameters whose gradients the trainer sums over ``dp_sp``)."""

from __future__ import annotations

from torch import nn

from dist.parallel_dims import ParallelDims
from parallel.checkpointing import apply_activation_checkpointing

__all__ = ["parallelize_model"]


def parallelize_model(
    model: nn.Module,
    dims: ParallelDims,
    *,
    layout: str = "contiguous",
    activation_checkpointing: str = "none",
    checkpoint_every: int = 2,
    lasp2_schedule: str = "overlap",
    fsdp: bool = False,
    fsdp_reshard_after_forward: bool | None = None,
    grad_reduce_dtype: str = "fp32",
    compile: bool = False,
) -> nn.Module:
    """Parallelise ``model`` (one module; a pipeline stage or the whole model) in place.
    ``grad_reduce_dtype`` (fp32 | bf16) is FSDP's reduce-scatter dtype;
    ``fsdp_reshard_after_forward`` None means yes without PP and no with it."""
    if dims.sp_enabled:
        from parallel.sequence_parallel import apply_sequence_parallel

        apply_sequence_parallel(
            model, group=dims.group("sp"), layout=layout, lasp2_schedule=lasp2_schedule
        )
    apply_activation_checkpointing(model, mode=activation_checkpointing, every=checkpoint_every)
    if compile:
        from parallel.compile import apply_compile

        apply_compile(model)
    if fsdp and dims.world_size > 1:
        from parallel.data_parallel import apply_fsdp, reduce_dtype_of

        reshard = fsdp_reshard_after_forward
        if reshard is None:
            reshard = not dims.pp_enabled
        apply_fsdp(
            model,
            dims.submesh("dp_sp"),
            reshard_after_forward=reshard,
            reduce_dtype=reduce_dtype_of(grad_reduce_dtype),
        )
    return model
