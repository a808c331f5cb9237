"""Rotary position embedding driven by explicit (global) position ids.

Position ids are explicit because under sequence parallelism a rank holds a shard of the
sequence (two non-adjacent slices with the zigzag layout), so positions are not ``arange(T)``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RotaryEmbedding", "apply_rotary"]


class RotaryEmbedding(nn.Module):
    """Produces ``cos``/``sin`` tables ``[T, head_dim // 2]`` for given positions.

    Args:
        head_dim: even head size.
        theta: RoPE base.
    """

    def __init__(self, head_dim: int, *, theta: float = 500000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids ``[T]`` (int) -> cos, sin ``[T, head_dim // 2]`` in fp64."""
        inv_freq = 1.0 / (
            self.theta
            ** (
                torch.arange(0, self.head_dim, 2, device=position_ids.device).float()
                / self.head_dim
            )
        )
        # fp64 angles: exact for positions in the millions, cast once for the caller.
        freqs = position_ids.double()[:, None] * inv_freq.double()[None, :]
        return freqs.cos(), freqs.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs ``(x[..., :D/2], x[..., D/2:])``.

    x ``[B, T, H, D]``, cos/sin ``[T, D/2]`` -> ``[B, T, H, D]`` in x's dtype.
    """
    cd = torch.promote_types(x.dtype, torch.float32)
    x1, x2 = x.to(cd).chunk(2, dim=-1)
    c = cos[None, :, None, :].to(cd)
    s = sin[None, :, None, :].to(cd)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)
