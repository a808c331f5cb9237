"""Linear-attention token mixers: linear, lightning, retention, simple_gla, gla, gated_deltanet.

The recurrence itself is delegated to ``self.attn_op``, a callable with the public signature of
the op family (see :mod:`models.ops`) that returns only ``o``. By default it is the
single-device op (Triton on CUDA, pure torch on CPU); ``parallel.sequence_parallel`` swaps it
for the LASP-2 version, so this module never knows about parallelism.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from models.layers.norm import RMSNorm
from models.layers.short_conv import ShortConvolution

__all__ = ["LINEAR_VARIANTS", "LinearAttention", "default_attn_op"]

LINEAR_VARIANTS = ("linear", "lightning", "retention", "simple_gla", "gla", "gated_deltanet")
_FAMILY = {
    "linear": "linear_attn",
    "lightning": "linear_attn",
    "retention": "linear_attn",
    "simple_gla": "linear_attn",
    "gla": "gla",
    "gated_deltanet": "gated_delta_rule",
}
# Data-dependent log gates are divided by this so the decay stays near 1 at init
# (GLA's normaliser): memory over hundreds of tokens rather than a handful.
_GATE_NORMALIZER = 16.0


def default_attn_op(op_family: str, *, backend: str = "auto") -> Callable[..., torch.Tensor]:
    """The single-device op of a family (looked up in :mod:`models.ops` at call time),
    returning only ``o``."""
    name = {
        "linear_attn": "chunk_linear_attn",
        "gla": "chunk_gla",
        "gated_delta_rule": "chunk_gated_delta_rule",
    }[op_family]

    def attn_op(*args, scale=None):
        import models.ops as ops

        return getattr(ops, name)(*args, scale=scale, backend=backend)[0]

    attn_op.__name__ = f"{name}_{backend}"
    attn_op.backend = backend  # read by parallel.sequence_parallel to keep the same kernels
    return attn_op


def fixed_decay(variant: str, num_heads: int) -> torch.Tensor:
    """Per-head log decay ``[H]`` of the data-independent variants."""
    h = torch.arange(num_heads, dtype=torch.float64)
    if variant == "lightning":
        # ALiBi-like slopes: head h forgets at rate 2^(-8 (h + 1) / H).
        return -(2.0 ** (-8.0 * (h + 1) / num_heads))
    if variant == "retention":
        # RetNet: gamma_h = 1 - 2^(-5 - h'), h' spread over [0, 5).
        spread = h * (5.0 / max(num_heads, 1))
        return torch.log1p(-(2.0 ** (-5.0 - spread)))
    raise ValueError(variant)


class LinearAttention(nn.Module):
    """One linear-attention layer: projections, gates, the recurrence, output norm and gate.

    Args:
        dim: model width.
        num_heads: H; ``head_dim = dim // num_heads`` for q/k and v.
        variant: one of :data:`LINEAR_VARIANTS`.
        conv_size: short-conv width (gated_deltanet only).
        gla_low_rank: rank of GLA's gate projection.
        backend: ``"auto"`` (Triton on CUDA), ``"triton"`` or ``"reference"``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        variant: str = "linear",
        conv_size: int = 4,
        gla_low_rank: int = 16,
        backend: str = "auto",
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if variant not in LINEAR_VARIANTS:
            raise ValueError(f"variant must be one of {LINEAR_VARIANTS}, got {variant!r}")
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.variant = dim, num_heads, variant
        self.head_dim = dim // num_heads
        self.op_family = _FAMILY[variant]
        self.attn_op: Callable[..., torch.Tensor] = default_attn_op(self.op_family, backend=backend)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.o_norm = RMSNorm(self.head_dim, eps=norm_eps)
        if variant in ("lightning", "retention"):
            self.register_buffer(
                "log_decay", fixed_decay(variant, num_heads).float(), persistent=False
            )
        if variant == "simple_gla":
            self.g_proj = nn.Linear(dim, num_heads, bias=True)
        if variant == "gla":
            self.gk_proj = nn.Sequential(
                nn.Linear(dim, gla_low_rank, bias=False), nn.Linear(gla_low_rank, dim, bias=True)
            )
        if variant in ("gla", "gated_deltanet"):
            self.gate_proj = nn.Linear(dim, dim, bias=False)
        if variant == "gated_deltanet":
            self.q_conv = ShortConvolution(dim, conv_size)
            self.k_conv = ShortConvolution(dim, conv_size)
            self.v_conv = ShortConvolution(dim, conv_size)
            self.b_proj = nn.Linear(dim, num_heads, bias=True)
            self.a_proj = nn.Linear(dim, num_heads, bias=False)
            self.A_log = nn.Parameter(torch.empty(num_heads))
            self.dt_bias = nn.Parameter(torch.empty(num_heads))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.variant == "gated_deltanet":
            with torch.no_grad():
                self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
                dt = torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(1e-1)).exp()
                self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[B, T, dim]`` -> ``[B, T, dim]``."""
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        # Gates and normalisation in fp32 (fp64 when the model runs in fp64, for exact tests).
        gd = torch.promote_types(x.dtype, torch.float32)
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.variant == "gated_deltanet":
            q, k, v = self.q_conv(q), self.k_conv(k), self.v_conv(v)
        q, k, v = (t.view(B, T, H, D) for t in (q, k, v))
        if self.variant == "gated_deltanet":
            q = F.normalize(q.to(gd), dim=-1).to(v.dtype)
            k = F.normalize(k.to(gd), dim=-1).to(v.dtype)
        elif self.variant in ("linear", "lightning", "retention"):
            # A positive feature map keeps the un-normalised state well conditioned.
            q, k = F.silu(q), F.silu(k)
        if self.op_family == "linear_attn":
            if self.variant == "linear":
                g = None
            elif self.variant == "simple_gla":
                g = F.logsigmoid(self.g_proj(x).to(gd)) / _GATE_NORMALIZER
            else:
                g = self.log_decay.to(gd).view(1, 1, H).expand(B, T, H)
            o = self.attn_op(q, k, v, g, scale=D**-0.5)
        elif self.op_family == "gla":
            gk = F.logsigmoid(self.gk_proj(x).to(gd)).view(B, T, H, D) / _GATE_NORMALIZER
            o = self.attn_op(q, k, v, gk, scale=D**-0.5)
        else:
            beta = torch.sigmoid(self.b_proj(x).to(gd))
            g = -self.A_log.to(gd).exp() * F.softplus(self.a_proj(x).to(gd) + self.dt_bias)
            o = self.attn_op(q, k, v, g, beta, scale=D**-0.5)
        o = self.o_norm(o)
        if self.variant in ("gla", "gated_deltanet"):
            o = o * F.silu(self.gate_proj(x)).view(B, T, H, D)
        return self.o_proj(o.reshape(B, T, H * D))
