"""Named model shapes."""

from __future__ import annotations

from dataclasses import replace

from models.llama import ModelArgs

__all__ = ["PRESETS", "get_preset"]

PRESETS: dict[str, ModelArgs] = {
    # The CPU demo: trains in about two minutes on two cores.
    "tiny": ModelArgs(
        dim=128,
        n_layers=4,
        n_heads=4,
        ffn_dim=384,
        vocab_size=256,
        layer_pattern="LLLN",
        linear_variant="linear",
        loss_chunk_tokens=2048,
    ),
    # Linear-Llama3-1B of the LASP-2 paper: 1.34B parameters with tied embeddings.
    "linear-llama3-1b": ModelArgs(
        dim=2048,
        n_layers=16,
        n_heads=16,
        n_kv_heads=16,
        ffn_dim=8192,
        vocab_size=128256,
        layer_pattern="L",
        linear_variant="linear",
        tie_embeddings=True,
    ),
    "linear-llama3-8b": ModelArgs(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        ffn_dim=14336,
        vocab_size=128256,
        layer_pattern="L",
        linear_variant="linear",
        tie_embeddings=False,
    ),
}


def get_preset(name: str, **overrides) -> ModelArgs:
    """A copy of preset ``name`` with ``overrides`` applied (ValueError for unknown names)."""
    if name not in PRESETS:
        raise ValueError(f"model.preset must be one of {sorted(PRESETS)}, got {name!r}")
    return replace(PRESETS[name], **overrides)
