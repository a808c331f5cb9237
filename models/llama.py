"""LinearLlama: a Llama-shaped decoder whose token mixers follow a layer pattern such as
``"LLLN"`` (L = linear attention of some variant, N = softmax attention), repeated.

Like torchtitan's models it knows nothing of parallelism: layers sit in an ``nn.ModuleDict``
keyed by their index so names survive pipeline splitting, and ``tok_embeddings``, ``norm`` and
``output`` may be set to None by a pipeline stage that does not own them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.layers import (
    LINEAR_VARIANTS,
    LinearAttention,
    RMSNorm,
    RotaryEmbedding,
    SoftmaxAttention,
    SwiGLU,
)
from models.loss import chunked_cross_entropy

__all__ = ["LinearLlama", "ModelArgs", "TransformerBlock"]


@dataclass
class ModelArgs:
    """Shape of a LinearLlama (see :mod:`models.presets`)."""

    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    ffn_dim: int = 768
    vocab_size: int = 256
    layer_pattern: str = "L"
    linear_variant: str = "linear"
    conv_size: int = 4
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    kernel_backend: str = "auto"
    loss_chunk_tokens: int = 4096

    def layer_kinds(self) -> list[str]:
        """``"L"`` or ``"N"`` for each layer: the pattern repeated to ``n_layers``."""
        p = self.layer_pattern
        return [p[i % len(p)] for i in range(self.n_layers)]

    def validate(self) -> None:
        """Raise ValueError naming the field for impossible shapes."""
        if not self.layer_pattern or set(self.layer_pattern) - {"L", "N"}:
            raise ValueError(
                f"model.layer_pattern must be a non-empty string of 'L' and 'N', "
                f"got {self.layer_pattern!r}"
            )
        if self.linear_variant not in LINEAR_VARIANTS:
            raise ValueError(
                f"model.linear_variant must be one of {list(LINEAR_VARIANTS)}, "
                f"got {self.linear_variant!r}"
            )
        for name in ("dim", "n_layers", "n_heads", "ffn_dim", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(
                f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads})"
            )
        if (self.dim // self.n_heads) % 2:
            raise ValueError(
                f"head size model.dim / model.n_heads = "
                f"{self.dim // self.n_heads} must be even (RoPE)"
            )
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            raise ValueError(
                f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads ({kv})"
            )
        if self.kernel_backend not in ("auto", "triton", "reference"):
            raise ValueError(
                f"model.kernel_backend must be auto, triton or reference, "
                f"got {self.kernel_backend!r}"
            )

    def num_params(self) -> int:
        """Parameter count (with tied embeddings counted once), without building the model."""
        with torch.device("meta"):
            m = LinearLlama(self)
        return sum(p.numel() for p in m.parameters())


class TransformerBlock(nn.Module):
    """Pre-norm block: ``h = x + mixer(norm(x)); out = h + mlp(norm(h))``."""

    def __init__(self, args: ModelArgs, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        if kind == "L":
            self.attention = LinearAttention(
                args.dim,
                args.n_heads,
                variant=args.linear_variant,
                conv_size=args.conv_size,
                backend=args.kernel_backend,
                norm_eps=args.norm_eps,
            )
        else:
            self.attention = SoftmaxAttention(args.dim, args.n_heads, num_kv_heads=args.n_kv_heads)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.feed_forward = SwiGLU(args.dim, args.ffn_dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x ``[B, T, dim]`` -> ``[B, T, dim]``."""
        a = self.attention_norm(x)
        h = x + (self.attention(a) if self.kind == "L" else self.attention(a, rope))
        return h + self.feed_forward(self.ffn_norm(h))


class LinearLlama(nn.Module):
    """The hybrid linear/softmax decoder.

    ``forward(tokens)`` returns the final hidden states (after ``norm``); the loss is computed
    from them by :meth:`loss` with a chunked cross-entropy that never holds fp32 logits for the
    whole sequence. Pipeline stages call ``forward`` with hidden states when they have no
    embedding, and get hidden states back when they have no ``norm``.
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        args.validate()
        self.args = args
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(args.vocab_size, args.dim)
        self.rope = RotaryEmbedding(args.dim // args.n_heads, theta=args.rope_theta)
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(args, kind) for i, kind in enumerate(args.layer_kinds())}
        )
        self.norm: RMSNorm | None = RMSNorm(args.dim, eps=args.norm_eps)
        self.output: nn.Linear | None = None
        if not args.tie_embeddings:
            self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        """Normal(0, init_std) for matrices, depth-scaled for the output projections."""
        std = self.args.init_std
        out_std = std / (2 * self.args.n_layers) ** 0.5
        for name, p in self.named_parameters():
            if p.dim() == 2 and "conv" not in name:
                is_out = name.endswith(("o_proj.weight", "w2.weight"))
                nn.init.trunc_normal_(p, std=out_std if is_out else std, a=-3 * std, b=3 * std)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)

    @property
    def head_weight(self) -> torch.Tensor:
        """``[vocab, dim]``: the output projection (the embedding when tied)."""
        if self.output is not None:
            return self.output.weight
        if self.tok_embeddings is None:
            raise RuntimeError("tied head needs tok_embeddings on this stage")
        return self.tok_embeddings.weight

    def forward(
        self, tokens: torch.Tensor, *, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """tokens ``[B, T]`` int (or hidden ``[B, T, dim]`` on a later pipeline stage).

        position_ids ``[T]``: global positions of these tokens (``arange(T)`` when None);
        sequence parallelism passes the shard's positions.

        Returns ``[B, T, dim]`` hidden states (normalised if this module owns ``norm``).
        """
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        if position_ids is None:
            position_ids = torch.arange(h.shape[1], device=h.device)
        rope = self.rope(position_ids)
        for layer in self.layers.values():
            h = layer(h, rope)
        return self.norm(h) if self.norm is not None else h

    def loss(
        self, hidden: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100
    ) -> torch.Tensor:
        """Summed (not averaged) next-token cross-entropy, in fp32.

        hidden ``[B, T, dim]``, labels ``[B, T]`` (``ignore_index`` where no target). Callers
        divide by the global number of target tokens so that every parallel layout agrees.
        """
        return chunked_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]),
            self.head_weight,
            labels.reshape(-1),
            chunk_tokens=self.args.loss_chunk_tokens,
            ignore_index=ignore_index,
        )
