"""Triton implementations of the public ops (same signatures as :mod:`models.ops.reference`).

Importing this package decorates the kernels, which is when ``TRITON_INTERPRET`` is read.
"""

from __future__ import annotations

from models.ops.triton_ops.delta import chunk_gated_delta_rule
from models.ops.triton_ops.nondelta import nondelta_attn

__all__ = [
    "chunk_linear_attn",
    "chunk_gla",
    "chunk_gated_delta_rule",
    "chunk_linear_attn_exchange",
    "chunk_gla_exchange",
]


def chunk_linear_attn(
    q, k, v, g=None, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None
):
    """No decay (``g is None``) or scalar log decay ``g`` ``[B, T, H]``; returns ``(o, ht)``."""
    return nondelta_attn(
        q,
        k,
        v,
        g,
        0 if g is None else 1,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )


def chunk_gla(
    q, k, v, gk, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None
):
    """Per-key-channel log decay ``gk`` ``[B, T, H, K]``; returns ``(o, ht)``."""
    return nondelta_attn(
        q,
        k,
        v,
        gk,
        2,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )


def chunk_linear_attn_exchange(q, k, v, g=None, *, scale=None, exchange):
    """:func:`chunk_linear_attn` whose incoming states come from ``exchange`` (LASP-2 inside
    the op, see :func:`nondelta_attn`); returns o."""
    return nondelta_attn(q, k, v, g, 0 if g is None else 1, scale=scale, exchange=exchange)[0]


def chunk_gla_exchange(q, k, v, gk, *, scale=None, exchange):
    """:func:`chunk_gla` whose incoming states come from ``exchange``; returns o."""
    return nondelta_attn(q, k, v, gk, 2, scale=scale, exchange=exchange)[0]
