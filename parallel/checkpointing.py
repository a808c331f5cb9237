"""Activation checkpointing applied from outside the model: each block recomputes its forward
during the backward instead of keeping its activations (1604.06174)."""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    checkpoint_wrapper,
)

__all__ = ["apply_activation_checkpointing"]


def apply_activation_checkpointing(model: nn.Module, *, mode: str = "full") -> int:
    """Wrap every block in ``model.layers`` (an ``nn.ModuleDict``) in place.

    Returns the number of wrapped blocks. ``mode`` is ``"full"`` (the whole block) or
    ``"none"`` (no-op). Names of parameters are kept (the wrapper is transparent to
    ``state_dict``), so checkpoints move freely between runs with and without it.
    """
    if mode == "none":
        return 0
    if mode != "full":
        raise ValueError(f"parallel.activation_checkpointing must be none or full, got {mode!r}")
    n = 0
    for name, block in list(model.layers.items()):
        model.layers[name] = checkpoint_wrapper(
            block, checkpoint_impl=CheckpointImpl.NO_REENTRANT, preserve_rng_state=False
        )
        n += 1
    return n
