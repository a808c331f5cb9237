"""Activation checkpointing applied from outside the model: each block recomputes its forward
during the backward instead of keeping its activations (1604.06174)."""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    checkpoint_wrapper,
)

__all__ = ["apply_activation_checkpointing", "is_checkpointed"]


def is_checkpointed(index: int, mode: str, every: int) -> bool:
    """Whether block ``index`` (its global index in the unsplit model) is checkpointed under
    ``mode`` and ``every`` (see :func:`apply_activation_checkpointing`)."""
    return mode == "full" or (mode == "partial" and index % every == every - 1)


def apply_activation_checkpointing(model: nn.Module, *, mode: str = "full", every: int = 2) -> int:
    """Wrap blocks of ``model.layers`` (an ``nn.ModuleDict``) in place.

    Returns the number of wrapped blocks. ``mode`` is ``"full"`` (every block), ``"partial"``
    (one block in ``every``, counted by the block's global index so that pipeline stages agree
    with the unsplit model: memory and recompute both scale by ``1 / every``) or ``"none"``.
    Parameter names are kept (the wrapper is transparent to ``state_dict``), so checkpoints
    move freely between runs with and without it.
    """
    if mode == "none":
        return 0
    if mode not in ("full", "partial"):
        raise ValueError(
            f"parallel.activation_checkpointing must be none, full or partial, got {mode!r}"
        )
    if every < 1:
        raise ValueError(f"parallel.checkpoint_every must be >= 1, got {every}")
    n = 0
    for name, block in list(model.layers.items()):
        if not is_checkpointed(int(name), mode, every):
            continue
        model.layers[name] = checkpoint_wrapper(
            block, checkpoint_impl=CheckpointImpl.NO_REENTRANT, preserve_rng_state=False
        )
        n += 1
    return n
