"""Host side of the gated delta rule's sequential state scans: whole sequences, or segments.

The state after each chunk depends on the one before, so a scan runs one program per
(sequence, head, V tile) sequentially over the sequence's chunks. With few long sequences
that leaves most SMs idle (one 128K sequence: 16 heads x 8 V tiles = 128 programs of 2048
chunks each). Then each sequence is cut into segments of chunks and the scan runs in three
passes, LASP-2's split inside one GPU:

1. every segment, in parallel: its scan from a zero state ``S_s`` and the product of its
   chunk transitions ``P_s`` (``K x K``; :func:`~.delta_kernels.delta_scan_fwd_kernel` with
   TRANSITION);
2. per sequence, over its few segments in order: ``h_in(s) = h``, ``h = P_s h + S_s``
   (:func:`~.delta_kernels.delta_seg_combine_kernel`);
3. every segment, in parallel: the ordinary scan from ``h_in(s)``, storing the chunk states
   and delta.

The backward runs the same three passes on the state adjoint with ``P_s^T`` (kept from the
forward, ``[NS, H, K, K]`` fp32). Passes 1 and 3 repeat a scan's work and pass 1 adds the
K-column transition product, so segments are used only when whole sequences leave the GPU
underfilled (see :func:`segment_chunks`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from triton.runtime.errors import OutOfResources

from models.ops.triton_ops import delta_kernels as sk
from models.ops.triton_ops.common import Groups, env_setting, make_groups, num_sms, tile_width

__all__ = ["ScanPlan", "plan_scan", "scan_forward", "scan_backward", "segment_chunks"]

_COMBINE_BV = 32


def scan_bv(n_seq: int, H: int, V: int, device: torch.device, *, fwd: bool = False) -> int:
    """V tile of a sequential scan over ``n_seq`` runs of chunks: narrower tiles give more
    programs with few runs; the forward scan takes 64-wide tiles while they still give a
    program per SM (H100, bf16: 8K x 8 fwd+bwd 8.2 -> 7.9 ms; one unsegmented 128K sequence
    stays faster with 16). ``LINSCALE_DELTA_SCAN_BV`` (16/32/64) overrides both scans,
    ``LINSCALE_DELTA_SCAN_FWD_BV`` the forward one."""
    sms = num_sms(device)
    if fwd and n_seq * H * triton.cdiv(V, 64) >= sms:
        auto = 64
    elif n_seq * H * triton.cdiv(V, 32) >= 2 * sms:
        auto = 32
    else:
        auto = 16
    bv = env_setting("LINSCALE_DELTA_SCAN_BV", auto, (16, 32, 64))
    return env_setting("LINSCALE_DELTA_SCAN_FWD_BV", bv, (16, 32, 64)) if fwd else bv


def segment_chunks(
    n_seq: int, H: int, K: int, V: int, avg_chunks: int, device: torch.device
) -> int:
    """Chunks per scan segment, 0 for whole sequences.

    ``LINSCALE_DELTA_SCAN_SEGMENT`` sets it (0 = never cut; K must be at most 128, for the
    ``K x K`` transition tile). By default sequences are cut only when even the narrowest scan
    tiles (one program per sequence, head and 16 state columns) leave SMs idle, into segments
    of at least 32 chunks that give about 1024 programs of 64 columns. On the H100 (bf16, H 16,
    K = V = 128, ``benchmarks/results/delta_quick_s9_segments_h100.json``): one 128K sequence
    fwd+bwd 21.2 ms whole, 18.6 with segments of 64 or 128 chunks, 19.0 with 32, 20.3 with
    228; two 32K sequences (256 programs whole) 8.8 ms whole against 9.4 with segments of 128.
    """
    auto = 0
    sms = num_sms(device)
    if K <= 128 and n_seq * H * triton.cdiv(V, 16) < sms:
        want = -(-1024 // (n_seq * H * triton.cdiv(V, 64)))
        auto = max(32, -(-avg_chunks // want))
        if 2 * auto > avg_chunks:  # fewer than two whole segments: no gain
            auto = 0
    seg = env_setting("LINSCALE_DELTA_SCAN_SEGMENT", auto, minimum=0)
    if seg and K > 128:
        raise ValueError(
            f"LINSCALE_DELTA_SCAN_SEGMENT={seg} needs K <= 128 (the K x K transition tile), "
            f"got K={K}; set it to 0 or leave it unset"
        )
    return seg


def launch_scan(kernel, grid, *args, K: int, **kw):
    """Launch a sequential scan with its loads pipelined one chunk ahead (``num_stages`` from
    ``LINSCALE_DELTA_SCAN_STAGES``, 1 to 3, default 2), falling back to one stage if the tiles
    do not fit in shared memory. Always 4 warps: 8 warps with 16-wide V tiles gave wrong
    results on the H100 (relative error 0.19 at 128K x 1, Triton 3.6), so it is not offered."""
    stages = env_setting("LINSCALE_DELTA_SCAN_STAGES", 2, (1, 2, 3))
    nw = 4
    try:
        kernel[grid](*args, K=K, **kw, num_warps=nw, num_stages=stages)
    except OutOfResources:
        if stages == 1:
            raise
        kernel[grid](*args, K=K, **kw, num_warps=nw, num_stages=1)


@dataclass
class ScanPlan:
    """How the scans run: ``segs`` None for one run per sequence, else the segment table
    (``segs.seq_g0`` the segments of each sequence); ``run_c`` ``[R + 1]`` int32 the first
    chunk of each run (sequences or segments) in the chunk table; ``n_runs`` R."""

    segs: Groups | None
    run_c: torch.Tensor
    n_runs: int


def plan_scan(grp: Groups, B: int, T: int, cu_seqlens, H: int, K: int, V: int) -> ScanPlan:
    """The scan runs for a chunk table ``grp`` (one group per chunk, from ``make_groups``)."""
    dev = grp.bos.device
    avg = -(-grp.n_chunks // max(1, grp.n_seq))
    seg = segment_chunks(grp.n_seq, H, K, V, avg, dev)
    if not seg:
        return ScanPlan(None, grp.seq_g0, grp.n_seq)
    segs = make_groups(
        B, T, cu_seqlens, chunk=grp.group_tokens, programs_per_group=H, device=dev,
        group_tokens=seg * grp.group_tokens,
    )  # fmt: skip
    end = torch.full((1,), grp.n_groups, dtype=torch.int32, device=dev)
    return ScanPlan(segs, torch.cat([segs.c0, end]).contiguous(), segs.n_groups)


def _prec(device: torch.device) -> str:
    return "tf32x3" if device.type == "cuda" else "ieee"


def _combine(plan, p_seg, local, start, entry, final, *, store_final, reverse):
    """Pass states (or, ``reverse``, state adjoints) across each sequence's segments:
    :func:`~.delta_kernels.delta_seg_combine_kernel` from ``start`` ``[N, H, K, V]`` (None: 0)
    with the segments' ``local`` results; fills ``entry`` ``[NS, H, K, V]`` and ``final``."""
    NS, H, K, V = local.shape
    n_seq = plan.segs.seq_g0.numel() - 1
    sk.delta_seg_combine_kernel[(triton.cdiv(V, _COMBINE_BV), n_seq, H)](
        p_seg, local, start if start is not None else entry, entry, final, plan.segs.seq_g0,
        H=H, K=K, V=V, BK=tile_width(K), BV=_COMBINE_BV, HAS_H0=start is not None,
        STORE_FINAL=store_final, REVERSE=reverse, PREC=_prec(local.device), num_warps=8,
        num_stages=1,
    )  # fmt: skip


def scan_forward(plan, grp, k, w, u, b, h0, hc, dlt, ht, *, H, K, V, C, store_final):
    """Fill the chunk-start states ``hc`` and ``delta`` (and ``ht`` if ``store_final``) from
    the WY pseudo-values; returns the segments' transition products ``[NS, H, K, K]`` (fp32)
    for the backward, or None when whole sequences ran."""
    dev = k.device
    bk = tile_width(K)
    if plan.segs is None:
        bv = scan_bv(plan.n_runs, H, V, dev, fwd=True)
        launch_scan(
            sk.delta_scan_fwd_kernel, (triton.cdiv(V, bv), plan.n_runs, H),
            k, w, u, b, h0 if h0 is not None else hc, hc, dlt, ht, grp.bos, grp.eos, plan.run_c,
            H=H, K=K, V=V, C=C, BK=bk, BV=bv, HAS_H0=h0 is not None, STORE_FINAL=store_final,
        )  # fmt: skip
        return None
    ns = plan.n_runs
    f32 = dict(device=dev, dtype=torch.float32)
    s_loc = torch.empty(ns, H, K, V, **f32)
    p_seg = torch.empty(ns, H, K, K, **f32)
    common = (grp.bos, grp.eos, plan.run_c)
    bv = scan_bv(ns, H, V, dev, fwd=True)
    launch_scan(
        sk.delta_scan_fwd_kernel, (triton.cdiv(V, bv), ns, H),
        k, w, u, b, s_loc, s_loc, dlt, s_loc, *common,
        H=H, K=K, V=V, C=C, BK=bk, BV=bv, HAS_H0=False, STORE_FINAL=True, STORE_CHUNKS=False,
    )  # fmt: skip
    bp = scan_bv(ns, H, K, dev, fwd=True)
    launch_scan(
        sk.delta_scan_fwd_kernel, (triton.cdiv(K, bp), ns, H),
        k, w, u, b, p_seg, p_seg, dlt, p_seg, *common,
        H=H, K=K, V=K, C=C, BK=bk, BV=bp, HAS_H0=False, STORE_FINAL=True, STORE_CHUNKS=False,
        TRANSITION=True,
    )  # fmt: skip
    h_in = torch.empty(ns, H, K, V, **f32)
    _combine(plan, p_seg, s_loc, h0, h_in, ht, store_final=store_final, reverse=False)
    del s_loc
    launch_scan(
        sk.delta_scan_fwd_kernel, (triton.cdiv(V, bv), ns, H),
        k, w, u, b, h_in, hc, dlt, h_in, *common,
        H=H, K=K, V=V, C=C, BK=bk, BV=bv, HAS_H0=True, STORE_FINAL=False,
    )  # fmt: skip
    return p_seg


def scan_backward(
    plan, grp, p_seg, q, k, w, b, do, dd, dht, dhc, dh0, scale, *, H, K, V, C, local_dd
):
    """Reverse scan of the state adjoint: completes ``dd`` in place (writes it whole if
    ``local_dd``: the scan forms the chunk-local part itself), fills the chunk-end adjoints
    ``dhc`` and ``dh0`` ``[N, H, K, V]`` (fp32); ``dht`` the final state's adjoint or None;
    ``p_seg`` what :func:`scan_forward` returned."""
    dev = k.device
    bk = tile_width(K)
    if plan.segs is None:
        bv = scan_bv(plan.n_runs, H, V, dev)
        launch_scan(
            sk.delta_scan_bwd_kernel, (triton.cdiv(V, bv), plan.n_runs, H),
            q, k, w, b, do, dd, dht if dht is not None else dh0, dhc, dh0, grp.bos, grp.eos,
            plan.run_c, scale,
            H=H, K=K, V=V, C=C, BK=bk, BV=bv, HAS_DHT=dht is not None, LOCAL_DD=local_dd,
        )  # fmt: skip
        return
    ns = plan.n_runs
    f32 = dict(device=dev, dtype=torch.float32)
    r_loc = torch.empty(ns, H, K, V, **f32)
    common = (grp.bos, grp.eos, plan.run_c, scale)
    bv = scan_bv(ns, H, V, dev)
    launch_scan(
        sk.delta_scan_bwd_kernel, (triton.cdiv(V, bv), ns, H),
        q, k, w, b, do, dd, r_loc, dhc, r_loc, *common,
        H=H, K=K, V=V, C=C, BK=bk, BV=bv, HAS_DHT=False, STORE_CHUNKS=False, LOCAL_DD=local_dd,
    )  # fmt: skip
    dh_end = torch.empty(ns, H, K, V, **f32)
    _combine(plan, p_seg, r_loc, dht, dh_end, dh0, store_final=True, reverse=True)
    launch_scan(
        sk.delta_scan_bwd_kernel, (triton.cdiv(V, bv), ns, H),
        q, k, w, b, do, dd, dh_end, dhc, r_loc, *common,
        H=H, K=K, V=V, C=C, BK=bk, BV=bv, HAS_DHT=True, LOCAL_DD=local_dd,
    )  # fmt: skip
