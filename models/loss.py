"""Chunked cross-entropy that never materialises fp32 logits for the whole sequence.

Because the loss is a scalar sum, each chunk's gradients can be computed right in the forward
(logits live for one chunk only) and merely scaled in the backward. Memory: one chunk of logits
plus ``dhidden`` (the size of ``hidden``) and ``dweight`` (fp32, the size of the head).
On CUDA the loss rows and ``softmax - onehot`` of each chunk come from one fused Triton kernel
(:mod:`models.ops.triton_ops.softmax_xent`) working in the logits' own buffer; elsewhere, or
with ``LINSCALE_CE_BACKEND=torch``, from torch ops on an fp32 (fp64 in tests) copy.
"""

from __future__ import annotations

import torch

from models.env_settings import env_setting

__all__ = ["chunked_cross_entropy"]

_CE_BACKENDS = ("auto", "triton", "torch")


def _fused_xent(hidden: torch.Tensor):
    """The fused Triton loss-and-gradient kernel for logits computed from ``hidden``, or None
    for the torch path (decided once per call, not per chunk).

    ``LINSCALE_CE_BACKEND``: ``auto`` (Triton for CUDA fp16/bf16/fp32 logits), ``triton`` (also
    on CPU under ``TRITON_INTERPRET=1``, tests) or ``torch``."""
    choice = env_setting("LINSCALE_CE_BACKEND", "auto", _CE_BACKENDS)
    ok_dtype = hidden.dtype in (torch.float16, torch.bfloat16, torch.float32)
    if choice == "torch" or not ok_dtype or (choice == "auto" and not hidden.is_cuda):
        return None
    try:
        from models.ops.triton_ops.softmax_xent import xent_loss_and_grad_
    except Exception:  # noqa: BLE001 - no (working) triton: the torch path is exact too
        if choice == "triton":
            raise
        return None
    return xent_loss_and_grad_


class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens, ignore_index):
        N = hidden.shape[0]
        ctx.weight_dtype = weight.dtype
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.empty_like(hidden) if need_h else None
        dw = (
            torch.zeros(
                weight.shape,
                dtype=torch.promote_types(weight.dtype, torch.float32),
                device=weight.device,
            )
            if need_w
            else None
        )
        cd = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 in tests
        total = torch.zeros((), dtype=cd, device=hidden.device)
        fused = _fused_xent(hidden)
        for s in range(0, N, chunk_tokens):
            h = hidden[s : s + chunk_tokens]
            y = labels[s : s + chunk_tokens]
            logits = h @ weight.t()  # [n, V], hidden's dtype (or autocast's)
            if fused is not None:
                # loss rows in fp32; logits overwritten by d(sum CE)/dlogits in their dtype
                total += fused(logits, y, ignore_index).sum().to(cd)
                g = logits
            else:
                logits = logits.to(cd)
                valid = y != ignore_index
                y_safe = torch.where(valid, y, torch.zeros_like(y))
                lse = torch.logsumexp(logits, dim=-1)
                tgt = logits.gather(1, y_safe[:, None]).squeeze(1)
                total += torch.where(valid, lse - tgt, torch.zeros_like(lse)).sum()
                if need_h or need_w:
                    # d(sum CE)/dlogits = softmax - onehot, zero on ignored rows.
                    grad = torch.softmax(logits, dim=-1)
                    grad[torch.arange(grad.shape[0], device=grad.device), y_safe] -= 1.0
                    grad *= valid[:, None]
                    g = grad.to(hidden.dtype)
            if need_h:
                dh[s : s + chunk_tokens] = g @ weight
            if need_w:
                dw += (g.t() @ h).to(dw.dtype)
        ctx.save_for_backward(dh, dw)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        dh, dw = ctx.saved_tensors
        gh = (dh * grad_out.to(dh.dtype)) if dh is not None else None
        gw = (dw * grad_out.to(dw.dtype)).to(ctx.weight_dtype) if dw is not None else None
        return gh, gw, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_tokens: int = 4096,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Sum over tokens of ``CE(hidden @ weight.T, labels)``.

    Args:
        hidden: ``[N, D]``.
        weight: ``[V, D]``.
        labels: ``[N]`` int64, ``ignore_index`` for positions without a target.
        chunk_tokens: tokens per chunk of logits.

    Returns:
        fp32 scalar (fp64 for fp64 inputs): the summed loss.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= weight.shape[0]))
    if bool(bad.any()):
        raise ValueError(
            f"labels must lie in [0, {weight.shape[0]}) (the vocabulary) or equal "
            f"ignore_index={ignore_index}; got {labels[bad][:4].tolist()}"
        )
    # Under autocast the activations are bf16 while the master weight is fp32 (no copy when
    # the dtypes already agree).
    weight_c = weight.to(hidden.dtype)
    return _ChunkedCE.apply(hidden, weight_c, labels, chunk_tokens, ignore_index)
