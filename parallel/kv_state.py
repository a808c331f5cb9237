"""A slice's state from zero, ``M = sum_t k_t^T v_t``, as strided batched matmuls over the heads.

LASP-2 (and the LASP-1 ring) need every slice's ``M`` before or beside the op. It was an einsum
in the inputs' 16-bit dtype, which rounded ``M`` to bf16 and ran on head-major copies. Here each
slice's heads are one batched GEMM that reads k and v in place (a head's ``[T, D]`` rows are
strided by ``H * D``, which BLAS takes as a leading dimension) and writes ``M`` in fp32; the
gradients are written by the same GEMMs straight into token-major ``[N, T, H, D]`` storage (C's
leading dimension ``H * D``), so autograd's sum with the op's own dk and dv is a contiguous add.
In a profile of a Linear-Llama-1B step at sp = 2 on an H100 the strided elementwise kernels of
the LASP-2 path went from 12.2 to 7.3 ms (32 calls) with fp32 ``M`` from strided GEMMs; writing
the gradients token-major took that sum from 0.21 to 0.14 ms per call at 32K x 16 x 128 bf16.
"""

from __future__ import annotations

import torch

__all__ = ["kv_state"]

_HALF = (torch.bfloat16, torch.float16)


def _bmm_to(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` batched, result in ``dtype``: 16-bit inputs on tensor cores with fp32
    accumulation and fp32 output on CUDA (upcast on CPU, which has no such kernel)."""
    if a.dtype in _HALF and dtype != a.dtype:
        if a.is_cuda:
            return torch.bmm(a, b, out_dtype=dtype)
        return torch.bmm(a.to(dtype), b.to(dtype))
    return torch.bmm(a, b).to(dtype)


class _KvState(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k, v, out_dtype):
        ctx.save_for_backward(k, v)
        # k[n].permute(1, 2, 0): [H, K, T]; v[n].transpose(0, 1): [H, T, V]; both views. The
        # dtypes are the caller's choice: autocast must not round the fp32 result.
        with torch.autocast(k.device.type, enabled=False):
            return torch.stack(
                [
                    _bmm_to(k[n].permute(1, 2, 0), v[n].transpose(0, 1), out_dtype)
                    for n in range(k.shape[0])
                ]
            )

    @staticmethod
    def backward(ctx, dm):
        k, v = ctx.saved_tensors
        N, T, H, K = k.shape
        dm = dm.to(k.dtype)  # 16-bit inputs: tensor-core products, as the kernels' own dk, dv
        dk = (
            torch.empty_like(k, memory_format=torch.contiguous_format)
            if ctx.needs_input_grad[0]
            else None
        )
        dv = (
            torch.empty_like(v, memory_format=torch.contiguous_format)
            if ctx.needs_input_grad[1]
            else None
        )
        with torch.autocast(k.device.type, enabled=False):
            for n in range(N):
                _grads(n, k, v, dm, dk, dv)
        return dk, dv, None


def _grads(n, k, v, dm, dk, dv):
    """Slice n's ``dk_t = v_t dM^T`` and ``dv_t = k_t dM``, written through ``[H, T, D]`` views
    of the token-major dk, dv (BLAS writes rows ``H * D`` apart; no copy)."""
    if dk is not None:
        torch.bmm(v[n].transpose(0, 1), dm[n].transpose(1, 2), out=dk[n].transpose(0, 1))
    if dv is not None:
        torch.bmm(k[n].transpose(0, 1), dm[n], out=dv[n].transpose(0, 1))


def kv_state(k: torch.Tensor, v: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``M[n, h] = sum_t k[n, t, h]^T v[n, t, h]``: k ``[N, T, H, K]``, v ``[N, T, H, V]`` (same
    dtype) -> ``[N, H, K, V]`` in ``out_dtype`` (LASP-2's state dtype: fp32, fp64 for fp64).
    Gradients flow to k and v in their dtype, contiguous ``[N, T, H, D]``."""
    if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3] or k.dtype != v.dtype:
        raise ValueError(
            f"kv_state: k {tuple(k.shape)} {k.dtype} and v {tuple(v.shape)} {v.dtype} must be "
            "[N, T, H, K] and [N, T, H, V] of one dtype"
        )
    return _KvState.apply(k, v, out_dtype)
