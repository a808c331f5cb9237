"""Host-side helpers shared by the Triton ops: packing, group tables, gate-gradient scans."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from models.env_settings import env_setting

__all__ = ["Groups", "make_groups", "check_inputs", "num_sms", "env_setting", "tile_width"]


def _target_programs() -> int:
    """How many programs the per-group kernels aim for, so that one long sequence fills the GPU
    (env ``LINSCALE_KERNEL_TARGET_PROGRAMS``; ``LINSCALE_KERNEL_GROUP_TOKENS`` fixes the group
    size instead)."""
    return env_setting("LINSCALE_KERNEL_TARGET_PROGRAMS", 1024, minimum=1)


def tile_width(x: int) -> int:
    """The tile width that covers ``x`` whole: the next power of two, at least 16 (the
    smallest dimension of a tensor-core product)."""
    return max(16, triton.next_power_of_2(x))


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


@dataclass
class Groups:
    """Work split of a packed batch: groups of whole chunks, never crossing a sequence end.

    bos/eos ``[G]`` int32 token ranges; seq_g0 ``[N + 1]`` int32 offsets of each sequence's
    groups (in order); cu the int64 cumulative sequence lengths ``[N + 1]``.
    """

    bos: torch.Tensor
    eos: torch.Tensor
    seq_g0: torch.Tensor
    cu: torch.Tensor
    n_seq: int
    n_groups: int
    group_tokens: int
    varlen: bool
    c0: torch.Tensor  # [G] int32 index of each group's first chunk among all chunks
    n_chunks: int


def make_groups(
    B: int,
    T: int,
    cu_seqlens: torch.Tensor | None,
    *,
    chunk: int,
    programs_per_group: int,
    device: torch.device,
    group_tokens: int | None = None,
) -> Groups:
    """Cut every sequence into groups of ``group_tokens`` (a multiple of ``chunk``).

    The default size gives about ``_target_programs()`` programs when each group runs
    ``programs_per_group`` programs (heads x state tiles).
    """
    if cu_seqlens is None:
        n_seq, total = B, B * T
        avg = T
    else:
        n_seq, total = cu_seqlens.numel() - 1, B * T
        avg = max(1, total // max(n_seq, 1))
    if group_tokens is None:
        env = env_setting("LINSCALE_KERNEL_GROUP_TOKENS", 0, minimum=1)
        if env:
            group_tokens = env
        else:
            want = max(1, -(-_target_programs() // max(1, n_seq * programs_per_group)))
            group_tokens = max(4 * chunk, -(-avg // want))
    group_tokens = max(chunk, -(-group_tokens // chunk) * chunk)
    if cu_seqlens is None:
        ng = max(1, triton.cdiv(T, group_tokens))
        starts = torch.arange(ng, device=device) * group_tokens
        seq = torch.arange(B, device=device)
        bos = (seq[:, None] * T + starts[None, :]).flatten()
        eos = torch.minimum(bos + group_tokens, (seq[:, None] * T + T).expand(B, ng).flatten())
        seq_g0 = torch.arange(B + 1, device=device) * ng
        cu = torch.arange(B + 1, device=device, dtype=torch.int64) * T
        varlen = False
    else:
        cu_list = [int(x) for x in cu_seqlens.tolist()]
        b_l, e_l, g0 = [], [], [0]
        for s, e in zip(cu_list[:-1], cu_list[1:]):
            for t in range(s, e, group_tokens):
                b_l.append(t)
                e_l.append(min(t + group_tokens, e))
            g0.append(len(b_l))
        bos = torch.tensor(b_l or [0], device=device)
        eos = torch.tensor(e_l or [0], device=device)
        seq_g0 = torch.tensor(g0, device=device)
        cu = cu_seqlens.to(device=device, dtype=torch.int64)
        varlen = True
    nch = (eos - bos + chunk - 1) // chunk
    c0 = nch.cumsum(0) - nch
    if cu_seqlens is None:
        n_chunks = B * triton.cdiv(T, chunk)
    else:
        n_chunks = sum(triton.cdiv(e - s, chunk) for s, e in zip(cu_list[:-1], cu_list[1:]))
    i32 = torch.int32
    return Groups(
        bos.to(i32).contiguous(),
        eos.to(i32).contiguous(),
        seq_g0.to(i32).contiguous(),
        cu,
        n_seq,
        int(bos.numel()),
        group_tokens,
        varlen,
        c0.to(i32).contiguous(),
        max(1, n_chunks),
    )


def check_inputs(q, k, v, initial_state, cu_seqlens, *, g=None, gk=None, beta=None):
    """Raise ValueError on shapes the kernels do not take (see models.ops for the API)."""
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, K], got {tuple(q.shape)}")
    B, T, H, K = q.shape
    for name, t, want in (("g", g, (B, T, H)), ("gk", gk, (B, T, H, K)), ("beta", beta, (B, T, H))):
        if t is not None and tuple(t.shape) != want:
            raise ValueError(f"{name} must be {want}, got {tuple(t.shape)}")
    V = v.shape[-1]
    if k.shape != q.shape or v.shape[:3] != (B, T, H):
        raise ValueError(
            f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if K > 256 or V > 256:
        raise ValueError(f"K and V must be <= 256, got K={K}, V={V}")
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"cu_seqlens needs B == 1, got B = {B}")
    n = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None and initial_state.shape != (n, H, K, V):
        raise ValueError(f"initial_state must be {(n, H, K, V)}, got {tuple(initial_state.shape)}")
