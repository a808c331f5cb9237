"""LASP-2H: sequence parallelism for the causal softmax layers of a hybrid model.

Each rank starts one AllGather of its K and V, computes the diagonal blocks (its queries
against its own slices' keys, causal) while they fly, then each local query slice attends to
all keys of the earlier slices (no mask) and the two partial results are merged by their
log-sum-exp. Backward uses the merged output and LSE for every block (so each block's
probabilities are the globally normalised ones and the gradients are exact), computes the
past blocks first, starts one reduce-scatter that returns the K/V gradients to their owners,
and computes the diagonal blocks while it flies.

Blocks run on cuDNN's fused attention (default on CUDA for fp16/bf16 on Hopper and newer with
head dim <= 128: the kernel ``scaled_dot_product_attention`` itself picks there, 1.7x aten's
flash kernel fwd+bwd at 32K tokens on an H100), on aten's flash kernel (default on other CUDA
cards; ``LINSCALE_LASP2H_BACKEND=flash`` also picks aten's CPU flash kernel), both through aten's
forward/backward entry points that expose the LSE, or on an exact math path (default elsewhere;
materialises the scores, tests only). ``LINSCALE_LASP2H_BACKEND`` = cudnn, flash or math forces
one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from models.env_settings import env_setting
from parallel._sp_comm import all_gather_async, group_info, reduce_scatter_async
from parallel.sequence_shard import (
    check_layout,
    local_slices,
    merge_slots,
    slice_owner,
    slots_per_rank,
    split_slots,
)

__all__ = ["lasp2h_attention", "attention_block_forward", "attention_block_backward"]


def _backend(q: torch.Tensor) -> str:
    forced = env_setting("LINSCALE_LASP2H_BACKEND", "", ("cudnn", "flash", "math"))
    if forced == "cudnn" and not q.is_cuda:
        raise ValueError("LINSCALE_LASP2H_BACKEND='cudnn' needs CUDA tensors")
    if forced:
        return forced
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256):
        return "math"
    hopper = torch.cuda.get_device_capability(q.device) >= (9, 0)
    cudnn = hopper and q.shape[-1] <= 128 and torch.backends.cuda.cudnn_sdp_enabled()
    return "cudnn" if cudnn else "flash"


def _repeat_kv(x: torch.Tensor, rep: int) -> torch.Tensor:
    return x if rep == 1 else x.repeat_interleave(rep, dim=2)


def _fold_heads(dx: torch.Tensor, rep: int) -> torch.Tensor:
    """``[B, T, Hkv * rep, D] -> [B, T, Hkv, D]`` summing each KV head's query group."""
    return dx if rep == 1 else dx.unflatten(2, (-1, rep)).sum(3)


def _heads(q, k, v, rep: int):
    """Head-major views ``[B, H, T, D]`` of q, k, v for aten's kernels (K/V repeated for GQA)."""
    return q.transpose(1, 2), _repeat_kv(k, rep).transpose(1, 2), _repeat_kv(v, rep).transpose(1, 2)


def attention_block_forward(q, k, v, *, causal: bool, scale: float):
    """One block of attention with its LSE.

    q ``[B, Tq, Hq, D]``, k/v ``[B, Tk, Hkv, D]``; ``causal`` needs ``Tq == Tk``.
    Returns ``o`` ``[B, Tq, Hq, D]`` (q's dtype), ``lse`` ``[B, Hq, Tq]`` fp32 (fp64 for fp64)
    and what the backward of the flash or cuDNN kernel needs from its forward (None for math).
    """
    rep = q.shape[2] // k.shape[2]
    backend = _backend(q)
    if backend == "flash" and not q.is_cuda:
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            *_heads(q, k, v, rep), 0.0, causal, scale=scale
        )
        return o.transpose(1, 2), lse, None
    if backend == "cudnn":
        out = torch.ops.aten._scaled_dot_product_cudnn_attention(
            *_heads(q, k, v, rep), None, True, 0.0, causal, False, scale=scale
        )
        # lse comes as [B, H, Tq, 1]; (cum_seq_q, cum_seq_k, max_q, max_k, philox seed/offset)
        return out[0].transpose(1, 2), out[1].squeeze(-1).float(), tuple(out[2:8])
    if backend == "flash":
        out = torch.ops.aten._scaled_dot_product_flash_attention(
            *_heads(q, k, v, rep), 0.0, causal, False, scale=scale
        )
        # (cum_seq_q, cum_seq_k, max_q, max_k, rng_state, unused), passed back verbatim.
        return out[0].transpose(1, 2), out[1].float(), tuple(out[2:8])
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    qh = q.to(ct).transpose(1, 2)
    kh, vh = (_repeat_kv(t, rep).to(ct).transpose(1, 2) for t in (k, v))
    s = (qh @ kh.transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    o = torch.softmax(s, dim=-1) @ vh
    return o.transpose(1, 2).to(q.dtype), lse, None


def attention_block_backward(do, q, k, v, o, lse, aux, *, causal: bool, scale: float):
    """Gradients of one block given the MERGED output ``o`` and ``lse`` of its query rows.

    ``aux`` is the block's third forward output. Shapes as in :func:`attention_block_forward`;
    returns dq ``[B, Tq, Hq, D]``, dk, dv
    ``[B, Tk, Hkv, D]`` in fp32 (fp64 for fp64 inputs).
    """
    rep = q.shape[2] // k.shape[2]
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    backend = _backend(q)
    if backend != "math":
        # do and o as the same transposed view of contiguous [B, Tq, Hq, D] tensors (cuDNN
        # wants their strides equal)
        doh, oh = (t.to(q.dtype).contiguous().transpose(1, 2) for t in (do, o))
        if backend == "flash" and not q.is_cuda:
            grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                doh, *_heads(q, k, v, rep), oh, lse.to(ct), 0.0, causal, scale=scale
            )
        elif backend == "cudnn":
            cum_q, cum_k, max_q, max_k, seed, offset = aux
            grads = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
                doh,
                *_heads(q, k, v, rep),
                oh,
                lse.float().unsqueeze(-1).contiguous(),
                seed,
                offset,
                None,
                cum_q,
                cum_k,
                max_q,
                max_k,
                0.0,
                causal,
                scale=scale,
            )
        else:
            cum_q, cum_k, max_q, max_k, rng, unused = aux
            grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
                doh,
                *_heads(q, k, v, rep),
                oh,
                lse.contiguous(),
                cum_q,
                cum_k,
                max_q,
                max_k,
                0.0,
                causal,
                rng,
                unused,
                scale=scale,
            )
        dq, dk, dv = (t.transpose(1, 2).to(ct) for t in grads[:3])
        return dq, _fold_heads(dk, rep), _fold_heads(dv, rep)
    qh, doh, oh = (t.to(ct).transpose(1, 2) for t in (q, do, o))
    kh, vh = (_repeat_kv(t, rep).to(ct).transpose(1, 2) for t in (k, v))
    s = (qh @ kh.transpose(-1, -2)) * scale
    p = (s - lse.to(ct)[..., None]).exp()
    if causal:
        p = p.masked_fill(torch.ones_like(p, dtype=torch.bool).triu(1), 0.0)
    dp = doh @ vh.transpose(-1, -2)
    ds = p * (dp - (doh * oh).sum(-1, keepdim=True))
    dq = (ds @ kh) * scale
    dk = (ds.transpose(-1, -2) @ qh) * scale
    dv = p.transpose(-1, -2) @ doh
    return (
        dq.transpose(1, 2),
        _fold_heads(dk.transpose(1, 2), rep),
        _fold_heads(dv.transpose(1, 2), rep),
    )


def _merge(o1, l1, o2, l2):
    """Merge two partial attention results over disjoint key sets by their LSE."""
    lse = torch.logaddexp(l1, l2)
    w1 = (l1 - lse).exp().transpose(1, 2)[..., None]
    w2 = (l2 - lse).exp().transpose(1, 2)[..., None]
    return (o1.to(lse.dtype) * w1 + o2.to(lse.dtype) * w2).to(o1.dtype), lse


class _Lasp2hAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, layout: str, scale: float):
        # Blocks, merges and gradient sums in the inputs' precision even under autocast.
        with torch.autocast(q.device.type, enabled=False):
            return _Lasp2hAttention._forward(ctx, q, k, v, group, layout, scale)

    @staticmethod
    def backward(ctx, do):
        with torch.autocast(do.device.type, enabled=False):
            return _Lasp2hAttention._backward(ctx, do)

    @staticmethod
    def _forward(ctx, q, k, v, group, layout: str, scale: float):
        rank, world = group_info(group)
        n = slots_per_rank(layout)
        B, T, Hkv, D = k.shape
        ts = T // n
        pending = all_gather_async(torch.stack([k, v]), group)  # [W, 2, B, T, Hkv, D]
        qs, ks, vs = (split_slots(t, n) for t in (q, k, v))
        o_diag, l_diag, aux_diag = attention_block_forward(qs, ks, vs, causal=True, scale=scale)
        o_diag, l_diag = o_diag.unflatten(0, (n, B)), l_diag.unflatten(0, (n, B))
        gathered = pending.wait().unflatten(3, (n, ts))  # [W, 2, B, n, ts, Hkv, D]
        mine = local_slices(rank, world, layout)
        order = [
            gathered[(o := slice_owner(j, world, layout))[0], :, :, o[1]] for j in range(max(mine))
        ]
        kv_past = torch.cat(order, dim=2) if order else None  # [2, B, max(mine) * ts, Hkv, D]
        outs, lses, aux_past = [], [], []
        for i, j in enumerate(mine):
            o_i, l_i = o_diag[i], l_diag[i]
            if j > 0:
                o_p, l_p, aux = attention_block_forward(
                    qs.unflatten(0, (n, B))[i],
                    kv_past[0, :, : j * ts],
                    kv_past[1, :, : j * ts],
                    causal=False,
                    scale=scale,
                )
                o_i, l_i = _merge(o_i, l_i, o_p, l_p)
                aux_past.append(aux)
            outs.append(o_i)
            lses.append(l_i)
        o = torch.cat(outs, dim=1)
        ctx.save_for_backward(q, k, v, o, torch.stack(lses), kv_past if order else q.new_empty(0))
        ctx.meta = (group, layout, scale, rank, world)
        ctx.aux = (aux_diag, aux_past)
        return o

    @staticmethod
    def _backward(ctx, do):
        q, k, v, o, lses, kv_past = ctx.saved_tensors
        group, layout, scale, rank, world = ctx.meta
        n = slots_per_rank(layout)
        B, T, Hkv, D = k.shape
        ts = T // n
        mine = local_slices(rank, world, layout)
        aux_diag, aux_past = ctx.aux
        aux_past = iter(aux_past)
        q_sl, do_sl, o_sl = (t.unflatten(1, (n, ts)) for t in (q, do, o))
        dq = torch.zeros(
            q_sl.shape,
            dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
            device=q.device,
        )
        # Past blocks first: their K/V gradients go to other ranks.
        dkv_all = dq.new_zeros(world, 2, B, T, Hkv, D)
        for i, j in enumerate(mine):
            if j == 0:
                continue
            dq_p, dk_p, dv_p = attention_block_backward(
                do_sl[:, i],
                q_sl[:, i],
                kv_past[0, :, : j * ts],
                kv_past[1, :, : j * ts],
                o_sl[:, i],
                lses[i],
                next(aux_past),
                causal=False,
                scale=scale,
            )
            dq[:, i] += dq_p
            for jj in range(j):
                r, slot = slice_owner(jj, world, layout)
                sl = slice(slot * ts, (slot + 1) * ts)
                dkv_all[r, 0, :, sl] += dk_p[:, jj * ts : (jj + 1) * ts]
                dkv_all[r, 1, :, sl] += dv_p[:, jj * ts : (jj + 1) * ts]
        pending = reduce_scatter_async(dkv_all, group)  # [2, B, T, Hkv, D]
        dq_d, dk_d, dv_d = attention_block_backward(
            split_slots(do, n),
            split_slots(q, n),
            split_slots(k, n),
            split_slots(v, n),
            split_slots(o, n),
            lses.flatten(0, 1),
            aux_diag,
            causal=True,
            scale=scale,
        )
        dq = dq.flatten(1, 2) + merge_slots(dq_d, n)
        dkv = pending.wait()
        dk = dkv[0] + merge_slots(dk_d, n)
        dv = dkv[1] + merge_slots(dv_d, n)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def lasp2h_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup | None,
    layout: str = "contiguous",
    scale: float | None = None,
) -> torch.Tensor:
    """Causal softmax attention (GQA) over the SP group's sequence.

    Args:
        q: ``[B, T_local, Hq, D]``; k, v: ``[B, T_local, Hkv, D]`` with ``Hq % Hkv == 0``.
        group: the SP process group (None: the default group).
        layout: ``"contiguous"`` or ``"zigzag"``.
        scale: defaults to ``D ** -0.5``.

    Returns:
        ``[B, T_local, Hq, D]``, this shard of the single-device causal attention.
    """
    check_layout(layout)
    if (
        q.dim() != 4
        or k.shape != v.shape
        or q.shape[:2] != k.shape[:2]
        or q.shape[-1] != k.shape[-1]
        or q.shape[2] % k.shape[2]
    ):
        raise ValueError(
            f"q {tuple(q.shape)} and k/v {tuple(k.shape)} must be [B, T, Hq, D] "
            "and [B, T, Hkv, D] with Hq a multiple of Hkv"
        )
    n = slots_per_rank(layout)
    if q.shape[1] % n:
        raise ValueError(f"q.shape[1] = {q.shape[1]} must be divisible by {n} for {layout!r}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    _, world = group_info(group)
    if world == 1:
        rep = q.shape[2] // k.shape[2]
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            _repeat_kv(k, rep).transpose(1, 2),
            _repeat_kv(v, rep).transpose(1, 2),
            is_causal=True,
            scale=scale,
        )
        return o.transpose(1, 2)
    return _Lasp2hAttention.apply(q, k, v, group, layout, scale)
