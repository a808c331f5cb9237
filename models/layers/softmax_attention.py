"""Causal softmax attention with GQA and RoPE (the N layers of a hybrid model)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from models.layers.rope import apply_rotary

__all__ = ["SoftmaxAttention", "sdpa_causal"]


def sdpa_causal(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None
) -> torch.Tensor:
    """Causal attention on full local sequences.

    q ``[B, T, Hq, D]``, k/v ``[B, T, Hkv, D]`` with ``Hq % Hkv == 0`` -> ``[B, T, Hq, D]``.
    """
    rep = q.shape[2] // k.shape[2]
    if rep > 1:
        k = k.repeat_interleave(rep, dim=2)
        v = v.repeat_interleave(rep, dim=2)
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale
    )
    return o.transpose(1, 2)


class SoftmaxAttention(nn.Module):
    """GQA attention; the core is ``self.attn_op(q, k, v, *, scale)`` (swapped by LASP-2H).

    Args:
        dim: model width.
        num_heads: query heads.
        num_kv_heads: key/value heads (divides ``num_heads``).
    """

    def __init__(self, dim: int, num_heads: int, *, num_kv_heads: int | None = None) -> None:
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if dim % num_heads or num_heads % num_kv_heads:
            raise ValueError(
                f"dim {dim} must divide by num_heads {num_heads}, and num_heads by "
                f"num_kv_heads {num_kv_heads}"
            )
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, dim, bias=False)
        self.attn_op: Callable[..., torch.Tensor] = sdpa_causal

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x ``[B, T, dim]``, rope = (cos, sin) ``[T, D/2]`` for this shard's positions."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        o = self.attn_op(q, k, v, scale=self.head_dim**-0.5)
        return self.o_proj(o.reshape(B, T, -1))
