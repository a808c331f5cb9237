"""Host side of the GLA intra-chunk kernels (:mod:`.gla_kernels`): version choice, settings and
launches, for :mod:`.nondelta`'s per-channel-gate path. Every group of ``cgrp`` is one chunk
(its ``group_tokens`` is the chunk length, 64)."""

from __future__ import annotations

import torch
import triton

from models.ops.triton_ops import gla_kernels as gla
from models.ops.triton_ops.common import env_setting

__all__ = ["gla_cumulative_gate", "gla_scores", "gla_intra_grads"]


def gla_cumulative_gate(gk: torch.Tensor, cgrp, bk: int) -> torch.Tensor:
    """In-chunk inclusive cumulative sum of the log gate ``gk`` ``[TT, H, K]``, fp32."""
    TT, H, K = gk.shape
    b = torch.empty(TT, H, K, device=gk.device, dtype=torch.float32)
    gla.chunk_cumsum_kernel[(triton.cdiv(K, bk), cgrp.n_groups, H)](
        gk, b, cgrp.bos, cgrp.eos, H=H, K=K, BT=cgrp.group_tokens, BK=bk
    )
    return b


def _gla_diag_range() -> int:
    """``LINSCALE_GLA_DIAG_RANGE`` (nats, default 40): the v3 intra-chunk kernels factor a
    whole chunk through one reference gate when its gate range is at most twice this, and the
    v2 computation (v3's fallback) factors a 16-row diagonal block through its first row when
    its range is at most this; beyond, it loops over the rows (with 0, everywhere unless all
    gates are 0). 40 keeps every ``exp`` factor and product far inside fp32."""
    return env_setting("LINSCALE_GLA_DIAG_RANGE", 40, tuple(range(0, 61)))


def _gla_intra() -> str:
    """Which GLA intra-chunk kernels run (``LINSCALE_GLA_INTRA``): ``v3`` (the default) factors
    whole chunks through one reference gate where their gate range allows it (10.5 ms GLA
    fwd+bwd at 8K x 8 on an H100 when introduced), ``v2`` works in 16-row blocks (14.1 ms)."""
    return env_setting("LINSCALE_GLA_INTRA", "v3", ("v2", "v3"))


def gla_scores(q, k, b, cgrp, bkf: int) -> torch.Tensor:
    """Unscaled intra-chunk scores A ``[TT, H, 64]`` in q's dtype (it only feeds tensor-core
    products in that dtype), from q, k ``[TT, H, K]`` and the in-chunk cumulative gate b (fp32);
    one chunk per group of ``cgrp``."""
    TT, H, K = q.shape
    bt = cgrp.group_tokens
    a = torch.empty(TT, H, bt, device=q.device, dtype=q.dtype)
    args = (q, k, b, a, cgrp.bos, cgrp.eos)
    meta = dict(H=H, K=K, BT=bt, BC=16, BK=bkf, DIAG_RANGE=_gla_diag_range(), num_stages=1)
    if _gla_intra() == "v3":
        # 8 warps measured slower (10.85 vs 10.47 ms GLA fwd+bwd)
        gla.gla_intra_fwd_v3_kernel[(cgrp.n_groups, H)](
            *args, BKS=min(64, bkf), num_warps=4, **meta
        )
    else:
        gla.gla_intra_fwd_v2_kernel[(bt // 16, cgrp.n_groups, H)](*args, num_warps=4, **meta)
    return a


def gla_intra_grads(q, k, v, b, do, cgrp, scale: float, bkf: int, bvf: int):
    """Intra-chunk parts of dq and dk, fp32 ``[TT, H, K]`` each."""
    TT, H, K = q.shape
    V = v.shape[-1]
    bt = cgrp.group_tokens
    f32 = dict(device=q.device, dtype=torch.float32)
    dqi = torch.empty(TT, H, K, **f32)
    dki = torch.empty(TT, H, K, **f32)
    args = (q, k, v, b, do, dqi, dki, cgrp.bos, cgrp.eos, scale)
    meta = dict(
        H=H, K=K, V=V, BT=bt, BC=16, BK=bkf, BV=bvf, DIAG_RANGE=_gla_diag_range(), num_stages=1
    )
    if _gla_intra() == "v3":
        # 4 warps spill at K = 128 (sm_90 compile statistics)
        gla.gla_intra_bwd_v3_kernel[(cgrp.n_groups, H)](
            *args, BKS=min(64, bkf), BVS=min(64, bvf), num_warps=8, **meta
        )
    else:
        gla.gla_intra_bwd_v2_kernel[(bt // 16, cgrp.n_groups, H)](*args, num_warps=4, **meta)
    return dqi, dki
