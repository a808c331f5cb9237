"""Linear-attention ops: Triton kernels on CUDA, chunked pure-torch references elsewhere.

The three public ops share one signature style (shared/DESIGN.md has the recurrences)::

    o, ht = chunk_linear_attn(q, k, v, g=None, *, scale=None, initial_state=None,
                              output_final_state=False, cu_seqlens=None, backend="auto")
    o, ht = chunk_gla(q, k, v, gk, *, ...)
    o, ht = chunk_gated_delta_rule(q, k, v, g, beta, *, ...)

``backend`` picks the implementation: ``"auto"`` (Triton when the inputs are on CUDA and the
Triton path imports, else the reference), ``"triton"`` or ``"reference"``. The environment
variable ``LINSCALE_OPS_BACKEND`` overrides ``"auto"`` (handy to force the reference on GPU or
the Triton interpreter on CPU with ``TRITON_INTERPRET=1``).

Dtypes: q, k, v in bf16, fp16 or fp32; o comes back in v's dtype, states in fp32. fp16's range
(65504) is the user's to respect: without decay the output grows with the sequence, and on
positive features (``elu + 1``) it passed that range by 8K tokens on an H100 probe (the output
then holds inf, as any fp16 result would; bf16 and fp32 do not overflow there).
"""

from __future__ import annotations

import warnings

import torch

from models.env_settings import env_setting
from models.ops import reference
from models.ops.naive import (
    naive_gated_delta_rule,
    naive_gla,
    naive_linear_attn,
    naive_recurrence,
)

__all__ = [
    "chunk_linear_attn",
    "chunk_gla",
    "chunk_gated_delta_rule",
    "naive_recurrence",
    "naive_linear_attn",
    "naive_gla",
    "naive_gated_delta_rule",
    "triton_available",
    "exchange_op",
]

_BACKENDS = ("auto", "triton", "reference")
_WARNED: list[bool] = []


_TRITON_ERROR: list[str] = []


def _triton_module():
    try:
        from models.ops import triton_ops
    except Exception as e:  # noqa: BLE001 - no triton, or a broken install: say so, once
        if not _TRITON_ERROR:
            _TRITON_ERROR.append(f"{type(e).__name__}: {e}")
        return None
    return triton_ops


def triton_available() -> bool:
    """Whether the Triton kernels import in this environment."""
    return _triton_module() is not None


def _no_autocast(x: torch.Tensor):
    """The ops pick their own precisions (fp32 states, gates and WY products); an enclosing
    autocast would silently turn their fp32 matmuls into bf16 ones."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def _pick(name: str, x: torch.Tensor, backend: str):
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = env_setting("LINSCALE_OPS_BACKEND", "auto", _BACKENDS)
    if backend == "reference":
        return getattr(reference, name)
    if backend == "auto" and not x.is_cuda:
        return getattr(reference, name)
    # The kernel module is imported lazily, only here: TRITON_INTERPRET is read when it is.
    mod = _triton_module()
    if mod is not None:
        return getattr(mod, name)
    if backend == "triton":
        raise RuntimeError(
            f"backend='triton' requested but the Triton kernels do not import ({_TRITON_ERROR[0]})"
        )
    if not _WARNED:
        _WARNED.append(True)
        warnings.warn(
            f"the Triton kernels do not import ({_TRITON_ERROR[0]}); {name} and the other "
            "linear-attention ops run on the slow pure-torch reference on this GPU. Set "
            "model.kernel_backend=reference to choose that on purpose.",
            RuntimeWarning,
            stacklevel=3,
        )
    return getattr(reference, name)


def _dispatch(name: str, backend: str, q: torch.Tensor, *args, **kwargs):
    """Pick the implementation of ``name`` for ``q`` and run it outside any autocast."""
    fn = _pick(name, q, backend)
    with _no_autocast(q):
        return fn(q, *args, **kwargs)


def exchange_op(name: str, x: torch.Tensor, backend: str = "auto"):
    """The state-exchange form of op ``name`` (``chunk_linear_attn`` or ``chunk_gla``) when
    ``backend`` picks the Triton kernels for ``x``, else None (the reference has none).

    It is called as ``o = fn(q, k, v, gate, *, scale, exchange)``: the op computes each
    sequence's state from zero and total decay, asks ``exchange`` for its incoming states and
    runs from them, and mirrors that in the backward (LASP-2's serial schedule inside the op,
    with no extra pass over the tokens; :mod:`models.ops.triton_ops.nondelta`)."""
    if name not in ("chunk_linear_attn", "chunk_gla"):
        raise ValueError(f"exchange_op: {name!r} has no exchange form")
    fn = _pick(name, x, backend)
    if fn is getattr(reference, name):
        return None
    inner = getattr(_triton_module(), f"{name}_exchange")

    def run(q, *args, **kwargs):
        with _no_autocast(q):
            return inner(q, *args, **kwargs)

    return run


def chunk_linear_attn(
    q,
    k,
    v,
    g=None,
    *,
    scale=None,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
    backend="auto",
):
    """Linear attention without decay (``g is None``) or with scalar log decay ``g``.

    q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, g ``[B, T, H]``; initial_state ``[B, H, K, V]``
    (``[N, H, K, V]`` with ``cu_seqlens`` ``[N + 1]`` and ``B == 1``). Returns ``(o, ht)``: o
    ``[B, T, H, V]`` in v's dtype, ht the fp32 final state or None.
    """
    return _dispatch(
        "chunk_linear_attn",
        backend,
        q,
        k,
        v,
        g,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )


def chunk_gla(
    q,
    k,
    v,
    gk,
    *,
    scale=None,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
    backend="auto",
):
    """Gated linear attention, per-key-channel log decay ``gk`` ``[B, T, H, K]``.

    Other arguments and the return value as :func:`chunk_linear_attn`.
    """
    return _dispatch(
        "chunk_gla",
        backend,
        q,
        k,
        v,
        gk,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )


def chunk_gated_delta_rule(
    q,
    k,
    v,
    g,
    beta,
    *,
    scale=None,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
    backend="auto",
):
    """Gated delta rule, scalar log decay ``g`` ``[B, T, H]`` (or None) and ``beta`` ``[B, T, H]``.

    Other arguments and the return value as :func:`chunk_linear_attn`.
    """
    return _dispatch(
        "chunk_gated_delta_rule",
        backend,
        q,
        k,
        v,
        g,
        beta,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )
