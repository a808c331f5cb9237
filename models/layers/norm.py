"""RMSNorm."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RMSNorm"]


class RMSNorm(nn.Module):
    """``y = x / rms(x) * weight`` over the last dimension, computed in fp32.

    Args:
        dim: size of the normalised (last) dimension.
        eps: added to the mean square.
    """

    def __init__(self, dim: int, *, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[..., dim]`` -> ``[..., dim]`` in x's dtype."""
        cd = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(cd)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(cd)).to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
