"""torch.compile of every block, applied from outside the model after activation checkpointing
and before FSDP (the torchtitan order).

Each block's own module is compiled in place (``nn.Module.compile``: parameter names and the
checkpoint wrapper stay as they are, so the recompute of a checkpointed block runs the compiled
code too). Inductor fuses what lies between the matmuls: the RMSNorms and their casts, the
residual adds, the feature map and SwiGLU's ``silu(a) * b``, forward and backward.

The token mixers' cores stay outside the compiled graphs: ``attn_op`` (our Triton kernels, or
LASP-2 / LASP-2H with their collectives once sequence parallelism has swapped them in) and a
swapped ``conv_op`` (the halo exchange) are wrapped in ``torch.compiler.disable``, so each
block compiles to the graphs before and after them. Apply sequence parallelism first.
Zero-bubble pipeline schedules cannot run compiled blocks (their backward is one graph, which
the split input / weight passes cannot divide): the config check refuses the combination.
"""

from __future__ import annotations

import torch
from torch import nn

from parallel.sequence_parallel import _ORIGINAL as _SP_ORIGINAL  # marks a swapped op

__all__ = ["apply_compile"]


def _opaque(module: nn.Module, attr: str) -> None:
    op = getattr(module, attr)
    if not getattr(op, "_linscale_compile_opaque", False):
        wrapped = torch.compiler.disable(op)
        wrapped._linscale_compile_opaque = True
        setattr(module, attr, wrapped)


def apply_compile(model: nn.Module) -> int:
    """Compile every block of ``model.layers`` in place; returns how many were compiled."""
    n = 0
    for block in model.layers.values():
        inner = getattr(block, "_checkpoint_wrapped_module", block)
        for module in inner.modules():
            if hasattr(module, "attn_op"):
                _opaque(module, "attn_op")
            if hasattr(module, "conv_op") and hasattr(module, _SP_ORIGINAL):
                _opaque(module, "conv_op")
        inner.compile()
        n += 1
    return n
