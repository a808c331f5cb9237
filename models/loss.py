"""Chunked cross-entropy that never materialises fp32 logits for the whole sequence.

Because the loss is a scalar sum, each chunk's gradients can be computed right in the forward
(logits live for one chunk only) and merely scaled in the backward. Memory: one chunk of logits
plus ``dhidden`` (the size of ``hidden``) and ``dweight`` (fp32, the size of the head).
"""

from __future__ import annotations

import torch

__all__ = ["chunked_cross_entropy"]


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
        for s in range(0, N, chunk_tokens):
            h = hidden[s : s + chunk_tokens]
            y = labels[s : s + chunk_tokens]
            logits = (h @ weight.t()).to(cd)  # [n, V]
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
    if hidden.dtype != weight.dtype:
        # Under autocast the activations are bf16 while the master weight is fp32.
        weight_c = weight.to(hidden.dtype)
    else:
        weight_c = weight
    return _ChunkedCE.apply(hidden, weight_c, labels, chunk_tokens, ignore_index)
