"""Fused softmax cross-entropy over one chunk of logits: loss per row and gradient in place.

The chunked cross-entropy of :mod:`models.loss` computes each chunk's logits ``[n, V]`` (bf16
under autocast, V ~ 128K for Llama-3 vocabularies), then needs the row log-sum-exp, the target
logit and ``softmax - onehot``. In torch that is an fp32 copy of the logits and five or six
passes over it (about 22 GB of memory traffic per 4096-token chunk at V = 128K); this kernel
reads the logits twice and writes the gradient once, in the logits' own buffer and dtype
(about 3 GB), with every sum in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["xent_loss_and_grad_"]

# a finite "minus infinity": exp(x - m) stays 0 / 1 without inf - inf = nan
_NEG = tl.constexpr(-1.0e30)


@triton.jit
def _xent_kernel(
    x_ptr,
    y_ptr,
    loss_ptr,
    n_cols,
    stride,
    ignore_index,
    BLOCK: tl.constexpr,
):
    """One program per row: ``loss = lse(x) - x[y]`` and ``x <- softmax(x) - onehot(y)`` (rows
    whose label is ``ignore_index``: loss 0 and gradient 0)."""
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride
    offs = tl.arange(0, BLOCK)
    # Pass 1: per-lane running max and rescaled sum (one reduction at the end, not per block).
    m = tl.full([BLOCK], _NEG, tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        x = tl.load(base + cols, mask=cols < n_cols, other=_NEG).to(tl.float32)
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
    mx = tl.max(m, 0)
    lse = mx + tl.log(tl.sum(s * tl.exp(m - mx), 0))
    y = tl.load(y_ptr + row)
    valid = y != ignore_index
    y_safe = tl.where(valid, y, 0).to(tl.int64)
    tgt = tl.load(base + y_safe).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - tgt, 0.0))
    # Pass 2: the gradient of the summed loss, written over the logits.
    keep = tl.where(valid, 1.0, 0.0)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        msk = cols < n_cols
        x = tl.load(base + cols, mask=msk, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) - tl.where(cols == y_safe, 1.0, 0.0)
        tl.store(base + cols, (g * keep).to(x_ptr.dtype.element_ty), mask=msk)


def xent_loss_and_grad_(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    """Per-row cross-entropy of ``logits`` ``[n, V]`` (any float dtype, rows contiguous) against
    ``labels`` ``[n]`` (in ``[0, V)`` or ``ignore_index``, which gives 0; the caller checks the
    range); returns the fp32 losses ``[n]``
    and overwrites ``logits`` with ``softmax(logits) - onehot(labels)`` (0 on ignored rows), the
    gradient of the summed loss, in the logits' dtype."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be a row-contiguous [n, V] matrix, got {logits.shape}")
    n, V = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return loss
    labels = labels.contiguous().to(torch.int64)
    block = min(4096, triton.next_power_of_2(V))
    _xent_kernel[(n,)](
        logits, labels, loss, V, logits.stride(0), ignore_index, BLOCK=block, num_warps=8
    )
    return loss
