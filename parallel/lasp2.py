"""LASP-2: sequence parallelism for linear attention with one AllGather of fixed-size states.

Over one slice of the sequence every variant is an affine map of the state entering it,
``S_out = A ∘ S_in + M`` (shared/DESIGN.md), with ``M`` the slice's final state from zero and

- ``A`` absent (pure linear attention), a scalar ``exp(sum g)`` ``[B, H]``, a vector
  ``exp(sum gk)`` ``[B, H, K]``, or for the gated delta rule the KxK matrix
  ``prod_t exp(g_t) (I - beta_t k_t^T k_t)`` ``[B, H, K, K]`` (acting on the key side of S).

A rank packs ``(A, M)`` of its slices (two under the zigzag layout: two "virtual ranks") into one
fp32 tensor, starts one AllGather, and computes its intra-slice output (the op with zero initial
state) while the states fly. Then it folds the earlier slices' pieces into its incoming states
``S_in`` and adds their contribution: the op is affine in the initial state, so
``o = o_intra + o_cross(S_in)`` with ``o_cross_t = scale * (q_t ⊙ decay_{<=t}) S_in`` for the
decay variants and ``o_cross_t = q'_t S_in``, ``q'_t = scale * q_t P_{<=t}``, for the delta rule.
``q'`` and ``A`` come exactly from the op itself run on a widened value/state: values
``[v | 0]`` and initial state ``[0 | I]`` (K extra columns), since columns of the state evolve
independently. Backward is the mirrored fold over the gathered state gradients: again one
AllGather, of ``dL/dS_in``. Sizes never depend on T.

The ``serial`` schedule (the trainer's default) gathers first and runs the op once from
``S_in``. For linear attention, scalar decay and GLA on the Triton kernels it runs inside the op
(``models.ops.exchange_op`` with :class:`_OpExchange`): the op scans its group-local states from
zero, which gives ``M`` (and ``A`` from the gates), the exchange gathers and folds, and the op
scans again from ``S_in``; its backward does the same with the state gradients, so no pass over
the T tokens is added. Elsewhere (the reference ops, ``LINSCALE_LASP2_FUSED=off``) ``M`` comes
from separate torch products (:func:`affine_pieces`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from models.env_settings import env_setting
from parallel._sp_comm import Pending, all_gather_async, group_info
from parallel.kv_state import kv_state
from parallel.sequence_shard import (
    check_layout,
    local_slices,
    merge_slots,
    slice_owner,
    slots_per_rank,
    split_slots,
)

__all__ = [
    "SCHEDULES",
    "lasp2_linear_attn",
    "lasp2_gla",
    "lasp2_gated_delta_rule",
    "resolve_op",
    "affine_pieces",
    "cross_term",
    "state_dtype",
    "compute_dtype",
]

_OP_NAMES = {
    "linear_attn": "chunk_linear_attn",
    "gla": "chunk_gla",
    "gated_delta_rule": "chunk_gated_delta_rule",
}


def resolve_op(family: str):
    """The single-device op of a family: :mod:`models.ops`' chunk op, else the naive loop."""
    try:
        import models.ops as ops

        return getattr(ops, _OP_NAMES[family])
    except (ImportError, AttributeError):
        from models.ops import naive

        return getattr(naive, f"naive_{family}")


# ---- affine algebra on states S [..., K, V] --------------------------------------------------


def _apply(kind: str, A: torch.Tensor | None, S: torch.Tensor) -> torch.Tensor:
    """``A ∘ S``."""
    if kind == "none":
        return S
    if kind == "scalar":
        return A[..., None, None] * S
    if kind == "vector":
        return A[..., None] * S
    return A @ S


def _apply_adjoint(kind: str, A: torch.Tensor | None, U: torch.Tensor) -> torch.Tensor:
    """``A^T ∘ U`` (the gradient of ``A ∘ S`` w.r.t. ``S``)."""
    if kind == "matrix":
        return A.transpose(-1, -2) @ U
    return _apply(kind, A, U)


def _grad_A(kind: str, U: torch.Tensor, S: torch.Tensor) -> torch.Tensor | None:
    """Gradient of ``<U, A ∘ S>`` w.r.t. ``A``."""
    if kind == "none":
        return None
    if kind == "scalar":
        return (U * S).sum((-1, -2))
    if kind == "vector":
        return (U * S).sum(-1)
    return U @ S.transpose(-1, -2)


def _a_numel(kind: str, K: int) -> int:
    return {"none": 0, "scalar": 1, "vector": K, "matrix": K * K}[kind]


def state_dtype(x: torch.Tensor) -> torch.dtype:
    """States and pieces are fp32 (fp64 for fp64 inputs, as in the naive reference)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _pack(A: torch.Tensor | None, M: torch.Tensor) -> torch.Tensor:
    """``A`` ``[..., (a)]``, ``M`` ``[..., K, V]`` -> ``[..., a + K * V]`` in M's state dtype."""
    lead, sd = M.shape[:-2], state_dtype(M)
    parts = [] if A is None else [A.to(sd).reshape(*lead, -1)]
    return torch.cat([*parts, M.to(sd).reshape(*lead, -1)], dim=-1)


def _no_autocast(device_type: str):
    """The fold stays in fp32 under the trainer's bf16 autocast (KxK products, prefix sums)."""
    return torch.autocast(device_type=device_type, enabled=False)


@dataclass
class _FoldState:
    """What the launch/finish pair of one layer shares (rank, layout, buffers in flight)."""

    kind: str
    K: int
    V: int
    rank: int
    world: int
    layout: str
    group: Any
    fwd: Pending | None = None
    bwd: Pending | None = None
    gathered: torch.Tensor | None = field(default=None, repr=False)
    s_in: torch.Tensor | None = field(default=None, repr=False)

    def unpack(self, P: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        a = _a_numel(self.kind, self.K)
        M = P[..., a:].unflatten(-1, (self.K, self.V))
        if self.kind == "none":
            return None, M
        A = P[..., :a]
        if self.kind == "scalar":
            A = A[..., 0]
        elif self.kind == "matrix":
            A = A.unflatten(-1, (self.K, self.K))
        return A, M

    def piece(self, gathered: torch.Tensor, j: int) -> torch.Tensor:
        r, slot = slice_owner(j, self.world, self.layout)
        return gathered[r, slot]


def _fold_forward(st: _FoldState, gathered: torch.Tensor) -> torch.Tensor:
    """Incoming states of this rank's slices ``[n, B, H, K, V]`` from all pieces
    ``[W, n, B, H, F]``: ``S_0 = 0``, ``S_{j+1} = A_j ∘ S_j + M_j``."""
    mine = local_slices(st.rank, st.world, st.layout)
    B, H = gathered.shape[2:4]
    S = gathered.new_zeros(B, H, st.K, st.V)
    s_in = {}
    for j in range(max(mine) + 1):
        if j in mine:
            s_in[j] = S
        if j < max(mine):
            A, M = st.unpack(st.piece(gathered, j))
            S = _apply(st.kind, A, S) + M
    return torch.stack([s_in[j] for j in mine])


def _fold_backward(st: _FoldState, d_gathered: torch.Tensor, *, with_a: bool = True):
    """Reverse fold: piece gradients ``[n, B, H, F]`` of this rank's slices from every rank's
    ``dL/dS_in`` ``[W, n, B, H, K, V]``; with ``with_a=False`` only the state part
    ``dL/dM`` ``[n, B, H, K, V]`` (the gradient of the state leaving each slice)."""
    mine = local_slices(st.rank, st.world, st.layout)
    U = torch.zeros_like(d_gathered[0, 0])  # dL/d(state leaving slice j)
    grads = {}
    for j in range(st.world * slots_per_rank(st.layout) - 1, min(mine) - 1, -1):
        A, _ = st.unpack(st.piece(st.gathered, j))
        if j in mine:
            grads[j] = _pack(_grad_A(st.kind, U, st.s_in[mine.index(j)]), U) if with_a else U
        r, slot = slice_owner(j, st.world, st.layout)
        U = d_gathered[r, slot] + _apply_adjoint(st.kind, A, U)
    return torch.stack([grads[j] for j in mine])


class _LaunchGather(torch.autograd.Function):
    """Forward: start the AllGather of the pieces. Backward: finish the AllGather of the state
    gradients started by :class:`_FinishGather` and run the reverse fold."""

    @staticmethod
    def forward(ctx, pieces: torch.Tensor, st: _FoldState) -> torch.Tensor:
        st.fwd = all_gather_async(pieces.detach(), st.group)
        ctx.st, ctx.device_type = st, pieces.device.type
        return pieces.view_as(pieces)

    @staticmethod
    def backward(ctx, _ignored: torch.Tensor):
        st = ctx.st
        with _no_autocast(ctx.device_type):
            return _fold_backward(st, st.bwd.wait()), None


class _FinishGather(torch.autograd.Function):
    """Forward: wait for the pieces and fold them into ``S_in``. Backward: start the AllGather of
    ``dL/dS_in`` (finished in :class:`_LaunchGather`, so independent work can run between)."""

    @staticmethod
    def forward(ctx, pieces: torch.Tensor, st: _FoldState) -> torch.Tensor:
        st.gathered = st.fwd.wait()
        st.fwd = None
        with _no_autocast(pieces.device.type):
            st.s_in = _fold_forward(st, st.gathered)
        ctx.st = st
        ctx.shape = pieces.shape
        return st.s_in.clone()

    @staticmethod
    def backward(ctx, d_s_in: torch.Tensor):
        st = ctx.st
        st.bwd = all_gather_async(d_s_in.to(st.gathered.dtype), st.group)
        return d_s_in.new_zeros(ctx.shape), None


class _OpExchange:
    """The LASP-2 exchange that runs inside the op (``models.ops.exchange_op``): the op hands
    over its slices' pieces and receives their incoming states (forward), and hands over the
    gradients of those states and receives the gradients of the states leaving its slices
    (backward): one AllGather each way, as in the autograd pair above."""

    def __init__(self, st: _FoldState, n: int, B: int):
        self.st, self.n, self.B = st, n, B

    def forward(self, A: torch.Tensor | None, M: torch.Tensor) -> torch.Tensor:
        """A ``[n * B, H(, K)]`` or None, M ``[n * B, H, K, V]`` -> S_in ``[n * B, H, K, V]``."""
        st = self.st
        pieces = _pack(A, M).unflatten(0, (self.n, self.B))
        st.gathered = all_gather_async(pieces, st.group).wait()
        return _fold_forward(st, st.gathered).flatten(0, 1)

    def backward(self, d_s_in: torch.Tensor):
        """Start gathering dL/dS_in from this rank's outputs ``[n * B, H, K, V]``; the returned
        function waits for it and returns dL/d(state leaving each slice), from the later slices
        of every rank (the op runs independent work in between)."""
        st = self.st
        pending = all_gather_async(d_s_in.unflatten(0, (self.n, self.B)), st.group)

        def finish() -> torch.Tensor:
            # dA is not needed: the op's own gate gradient covers it.
            return _fold_backward(st, pending.wait(), with_a=False).flatten(0, 1)

        return finish


LASP2_FUSED = ("auto", "off")


def _exchange_op(family: str, op, x: torch.Tensor):
    """The op's exchange form (``models.ops.exchange_op``) when ``op`` is the family's
    ``models.ops`` op (plain, or with only ``backend`` bound) on the Triton kernels and
    ``LINSCALE_LASP2_FUSED`` is ``auto`` (the default; ``off`` keeps the separate state
    products); else None."""
    if (
        family == "gated_delta_rule"
        or env_setting("LINSCALE_LASP2_FUSED", "auto", LASP2_FUSED) == "off"
    ):
        return None
    import models.ops as ops

    base = getattr(ops, _OP_NAMES[family], None)
    if op is base:
        backend = "auto"
    elif isinstance(op, functools.partial) and op.func is base and not op.args:
        if set(op.keywords) - {"backend"}:
            return None
        backend = op.keywords.get("backend", "auto")
    else:
        return None
    return ops.exchange_op(_OP_NAMES[family], x, backend)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Dtype of the T-long matmuls (M, cross term): the input's when it is 16-bit (tensor cores
    with fp32 accumulation, like the kernels' own ``q S`` products), else the state dtype."""
    return x.dtype if x.dtype in (torch.bfloat16, torch.float16) else state_dtype(x)


def cross_term(q_x: torch.Tensor, s_in: torch.Tensor, cd: torch.dtype) -> torch.Tensor:
    """``q_x S_in``: q_x ``[N, T, H, K]``, s_in ``[N, H, K, V]`` -> ``[N, T, H, V]`` (state dtype).

    With 16-bit inputs the state is split into a 16-bit head and its 16-bit remainder, two
    tensor-core matmuls that keep ~16 mantissa bits of the fp32 state (one cast would keep 8).
    """
    if cd == s_in.dtype:
        return torch.einsum("nthk,nhkv->nthv", q_x.to(cd), s_in)
    hi = s_in.to(cd)
    lo = (s_in - hi.to(s_in.dtype)).to(cd)
    q_x = q_x.to(cd)
    out = torch.einsum("nthk,nhkv->nthv", q_x, hi).to(s_in.dtype)
    return out + torch.einsum("nthk,nhkv->nthv", q_x, lo).to(s_in.dtype)


def affine_pieces(kind: str, q, k, v, gate, *, scale: float, with_q: bool = True):
    """Pieces of the decay variants from torch ops.

    q, k ``[N, T, H, K]``, v ``[N, T, H, V]``, gate ``g`` ``[N, T, H]`` (scalar), ``gk``
    ``[N, T, H, K]`` (vector) or None. Returns ``A`` (None / ``[N, H]`` / ``[N, H, K]``) and
    ``M`` ``[N, H, K, V]`` in the state dtype, and ``q_x`` ``[N, T, H, K]`` (compute dtype)
    with ``o_cross = q_x S_in`` (None when ``with_q`` is False). Gates are cumulated in fp32
    (fp64 for fp64).
    """
    sd, cd = state_dtype(q), compute_dtype(q)
    k, v = k.to(cd), v.to(cd)
    if kind == "none":
        return None, kv_state(k, v, sd), (q.to(cd) * scale if with_q else None)
    gc = gate.to(sd).cumsum(1)
    gT = gc[:, -1]
    to_end, from_start = (gT[:, None] - gc).exp(), gc.exp() * scale
    if kind == "scalar":
        to_end, from_start = to_end[..., None], from_start[..., None]
    M = kv_state((k * to_end).to(cd), v, sd)
    return gT.exp(), M, ((q * from_start).to(cd) if with_q else None)


def _check(q, k, v, layout: str, n: int) -> None:
    check_layout(layout)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be [B, T_local, H, D]")
    if q.shape != k.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree")
    if q.shape[1] % n:
        raise ValueError(
            f"q.shape[1] = T_local = {q.shape[1]} must be divisible by {n} for layout {layout!r}"
        )


SCHEDULES = ("overlap", "serial")


def _lasp2(
    family: str, q, k, v, gates: tuple, *, group, layout: str, scale, op, schedule: str = "overlap"
):
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    n = slots_per_rank(layout)
    _check(q, k, v, layout, n)
    rank, world = group_info(group)
    K, V = q.shape[-1], v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    op = op or resolve_op(family)
    if world == 1:
        # Zigzag with one rank holds slices 0 and 1 in order: the plain sequence.
        return op(q, k, v, *gates, scale=scale)[0]
    qs, ks, vs = (split_slots(t, n) for t in (q, k, v))
    gs = tuple(None if t is None else split_slots(t, n) for t in gates)
    B = q.shape[0]
    fused = _exchange_op(family, op, q) if schedule == "serial" else None
    if fused is not None:
        gate = gs[0]
        kind = "none" if gate is None else ("scalar" if family == "linear_attn" else "vector")
        ex = _OpExchange(_FoldState(kind, K, V, rank, world, layout, group), n, B)
        return merge_slots(fused(qs, ks, vs, gate, scale=scale, exchange=ex), n)
    if family == "gated_delta_rule":
        kind = "matrix"
        # One op call gives o_intra, q' = scale q P, M and A: values [v | 0], state [0 | I].
        sd = state_dtype(q)
        h0 = torch.cat(
            [q.new_zeros(K, V, dtype=sd), torch.eye(K, dtype=sd, device=q.device)], dim=-1
        )
        h0 = h0.expand(qs.shape[0], q.shape[2], K, V + K)
        vx = torch.cat([vs, vs.new_zeros(*vs.shape[:-1], K)], dim=-1)
        ox, hx = op(qs, ks, vx, *gs, scale=scale, initial_state=h0, output_final_state=True)
        o_intra, q_x = ox[..., :V], ox[..., V:]
        A, M = hx[..., V:], hx[..., :V]
    else:
        gate = gs[0]
        kind = "none" if gate is None else ("scalar" if family == "linear_attn" else "vector")
        A, M, q_x = affine_pieces(kind, qs, ks, vs, gate, scale=scale, with_q=schedule == "overlap")
    # serial: gather first (a few MB, tens of microseconds), then ONE op call from S_in, with no
    # separate cross term (its fp32 passes over [T, H, V] and their backward).
    serial = schedule == "serial" and family != "gated_delta_rule"
    st = _FoldState(kind, K, V, rank, world, layout, group)
    pieces = _LaunchGather.apply(_pack(A, M).unflatten(0, (n, B)), st)
    if family != "gated_delta_rule" and not serial:
        o_intra = op(qs, ks, vs, *gs, scale=scale)[0]  # overlaps the AllGather
    s_in = _FinishGather.apply(pieces, st).flatten(0, 1)  # [n * B, H, K, V]
    if serial:
        return merge_slots(op(qs, ks, vs, *gs, scale=scale, initial_state=s_in)[0], n)
    o_cross = cross_term(q_x, s_in, compute_dtype(q))
    return merge_slots((o_intra.to(s_in.dtype) + o_cross).to(o_intra.dtype), n)


def lasp2_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    group: dist.ProcessGroup | None,
    layout: str = "contiguous",
    scale: float | None = None,
    op=None,
    schedule: str = "overlap",
) -> torch.Tensor:
    """Linear attention (``g`` None) or scalar decay over the SP group's sequence.

    Args:
        q, k: ``[B, T_local, H, K]``; v: ``[B, T_local, H, V]`` (this rank's shard).
        g: ``[B, T_local, H]`` log decay or None.
        group: the SP process group (None: the default group).
        layout: ``"contiguous"`` or ``"zigzag"`` (see :mod:`parallel.sequence_shard`).
        scale: defaults to ``K ** -0.5``.
        op: the single-device op (default: :func:`resolve_op`).
        schedule: ``"overlap"`` (default): the intra-slice op runs from a zero state while the
            AllGather flies, then the incoming state's term ``q_x S_in`` is added;
            ``"serial"``: AllGather first, then one op call from ``S_in`` (no separate cross
            term; the collective is exposed but tiny; inside the Triton op when it runs, see
            the module docstring). Both are exact.

    Returns:
        ``o`` ``[B, T_local, H, V]``, equal to this shard of the single-device output.
    """
    return _lasp2(
        "linear_attn",
        q,
        k,
        v,
        (g,),
        group=group,
        layout=layout,
        scale=scale,
        op=op,
        schedule=schedule,
    )


def lasp2_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gk: torch.Tensor,
    *,
    group: dist.ProcessGroup | None,
    layout: str = "contiguous",
    scale: float | None = None,
    op=None,
    schedule: str = "overlap",
) -> torch.Tensor:
    """GLA (per-key-channel decay ``gk`` ``[B, T_local, H, K]``); see :func:`lasp2_linear_attn`."""
    return _lasp2(
        "gla", q, k, v, (gk,), group=group, layout=layout, scale=scale, op=op, schedule=schedule
    )


def lasp2_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor,
    *,
    group: dist.ProcessGroup | None,
    layout: str = "contiguous",
    scale: float | None = None,
    op=None,
) -> torch.Tensor:
    """Gated delta rule (``g``, ``beta`` ``[B, T_local, H]``); see :func:`lasp2_linear_attn`.

    The pieces come from the op itself, so the AllGather overlaps only the fold's neighbours
    here, not the intra-slice op (which produces them).
    """
    return _lasp2(
        "gated_delta_rule", q, k, v, (g, beta), group=group, layout=layout, scale=scale, op=op
    )
