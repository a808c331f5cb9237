"""Causal depthwise short convolution (Gated DeltaNet's q/k/v conv)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ShortConvolution", "causal_conv1d"]


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    left_context: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal depthwise convolution along time.

    Args:
        x: ``[B, T, C]``.
        weight: ``[C, W]``; ``y_t = sum_j weight[:, j] * x_{t - W + 1 + j}``.
        bias: ``[C]`` or None.
        left_context: ``[B, W - 1, C]``, the tokens before ``x`` (zeros when None). Sequence
            parallelism passes the previous rank's tail here.

    Returns:
        ``[B, T, C]`` in x's dtype.
    """
    W = weight.shape[-1]
    if left_context is None:
        xp = F.pad(x.transpose(1, 2), (W - 1, 0))
    else:
        xp = torch.cat((left_context, x), dim=1).transpose(1, 2)
    y = F.conv1d(xp, weight[:, None, :], bias, groups=x.shape[-1])
    return y.transpose(1, 2)


class ShortConvolution(nn.Module):
    """Depthwise causal conv with an optional SiLU, its op swappable through ``conv_op``.

    ``conv_op(x, weight, bias) -> y`` defaults to :func:`causal_conv1d`; sequence parallelism
    replaces it with a version that fetches the previous ``W - 1`` tokens from their owner.

    Args:
        channels: C.
        kernel_size: W.
        activation: apply SiLU after the conv.
    """

    def __init__(self, channels: int, kernel_size: int = 4, *, activation: bool = True) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(channels, kernel_size))
        self.activation = activation
        self.conv_op = causal_conv1d
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.weight, -(self.kernel_size**-0.5), self.kernel_size**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[B, T, C]`` -> ``[B, T, C]``."""
        y = self.conv_op(x, self.weight, None)
        return F.silu(y) if self.activation else y
