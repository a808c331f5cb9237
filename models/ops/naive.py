"""Naive per-token recurrences: the ground truth every kernel and parallel path is tested against.

All four linear-attention variants of shared/DESIGN.md are one recurrence, inclusive of the
current token, with the state ``S`` ``[B, H, K, V]`` in fp32 (or the input dtype if it is fp64):

- linear:        ``S_t = S_{t-1} + k_t^T v_t``
- scalar decay:  ``S_t = exp(g_t) S_{t-1} + k_t^T v_t``
- vector decay:  ``S_t = diag(exp(gk_t)) S_{t-1} + k_t^T v_t``
- delta rule:    ``S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t``

and ``o_t = scale * q_t S_t``. These loops are slow by design (one step per token) and meant for
tests in fp64; the chunked forms in :mod:`models.ops.reference` are the fast pure-torch path.
"""

from __future__ import annotations

import torch

__all__ = [
    "naive_recurrence",
    "naive_linear_attn",
    "naive_gla",
    "naive_gated_delta_rule",
]


def _state_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _one_sequence(q, k, v, g, gk, beta, scale, h0):
    """One sequence: q, k ``[T, H, K]``, v ``[T, H, V]``, g/beta ``[T, H]``, gk ``[T, H, K]``,
    h0 ``[H, K, V]``."""
    T = q.shape[0]
    S = h0
    outs = []
    for t in range(T):
        kt, vt = k[t], v[t]  # [H, K], [H, V]
        if beta is not None:
            bt = beta[t][:, None]  # [H, 1]
            # Delta rule: S <- exp(g) S, then S <- S + beta k^T (v - k S).
            if g is not None:
                S = S * g[t].exp()[:, None, None]
            pred = torch.einsum("hk,hkv->hv", kt, S)
            S = S + torch.einsum("hk,hv->hkv", kt, bt * (vt - pred))
        else:
            if g is not None:
                S = S * g[t].exp()[:, None, None]
            if gk is not None:
                S = S * gk[t].exp()[:, :, None]
            S = S + torch.einsum("hk,hv->hkv", kt, vt)
        outs.append(scale * torch.einsum("hk,hkv->hv", q[t], S))
    o = torch.stack(outs, 0) if outs else v.new_zeros(v.shape).to(S.dtype)
    return o, S


def naive_recurrence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    gk: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The general recurrence, one token at a time.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
        g: ``[B, T, H]`` log scalar decay (<= 0) or None.
        gk: ``[B, T, H, K]`` log per-key-channel decay or None.
        beta: ``[B, T, H]`` delta-rule step size; when given the delta rule is used.
        scale: defaults to ``K ** -0.5``.
        initial_state: ``[B, H, K, V]`` (``[N, H, K, V]`` with ``cu_seqlens``), or None for zeros.
        output_final_state: return the final state(s).
        cu_seqlens: ``[N + 1]`` cumulative document lengths with ``B == 1``; the state restarts
            at each document boundary (from ``initial_state[n]``).

    Returns:
        ``o`` ``[B, T, H, V]`` in v's dtype and the final state ``[B or N, H, K, V]`` (fp32, fp64
        for fp64 inputs) or None.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    if scale is None:
        scale = K**-0.5
    sd = _state_dtype(q)
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens needs B == 1, got B = {B}")
        bounds = [int(x) for x in cu_seqlens.tolist()]
        segs = [(0, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
    else:
        segs = [(b, 0, T) for b in range(B)]
    N = len(segs)
    if initial_state is None:
        initial_state = q.new_zeros(N, H, K, V, dtype=sd)
    o = torch.zeros(B, T, H, V, dtype=sd, device=q.device)
    finals = []
    for n, (b, s, e) in enumerate(segs):

        def cut(x, b=b, s=s, e=e):
            return None if x is None else x[b, s:e].to(sd)

        o_n, S_n = _one_sequence(
            cut(q),
            cut(k),
            cut(v),
            cut(g),
            cut(gk),
            cut(beta),
            scale,
            initial_state[n].to(sd),
        )
        o[b, s:e] = o_n
        finals.append(S_n)
    ht = torch.stack(finals, 0) if output_final_state else None
    return o.to(v.dtype), ht


def naive_linear_attn(
    q, k, v, g=None, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None
):
    """No decay (``g is None``) or scalar decay ``g`` ``[B, T, H]``.

    See :func:`naive_recurrence`.
    """
    return naive_recurrence(
        q,
        k,
        v,
        g=g,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )


def naive_gla(
    q, k, v, gk, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None
):
    """Per-key-channel decay ``gk`` ``[B, T, H, K]``; see :func:`naive_recurrence`."""
    return naive_recurrence(
        q,
        k,
        v,
        gk=gk,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )


def naive_gated_delta_rule(
    q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None
):
    """Gated delta rule with ``g`` ``[B, T, H]`` (or None) and ``beta`` ``[B, T, H]``."""
    return naive_recurrence(
        q,
        k,
        v,
        g=g,
        beta=beta,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )
