"""Model layers, free of any parallelism: sequence-mixing ops sit behind hook attributes
(``attn_op``, ``conv_op``) that ``parallel/`` swaps from outside."""

from models.layers.linear_attention import LINEAR_VARIANTS, LinearAttention
from models.layers.mlp import SwiGLU
from models.layers.norm import RMSNorm
from models.layers.rope import RotaryEmbedding, apply_rotary
from models.layers.short_conv import ShortConvolution, causal_conv1d
from models.layers.softmax_attention import SoftmaxAttention

__all__ = [
    "LINEAR_VARIANTS",
    "LinearAttention",
    "RMSNorm",
    "RotaryEmbedding",
    "ShortConvolution",
    "SoftmaxAttention",
    "SwiGLU",
    "apply_rotary",
    "causal_conv1d",
]
