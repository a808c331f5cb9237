"""Shared input builders and comparisons for the op tests (fp64 naive recurrence as the oracle)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.ops import naive

__all__ = ["VARIANTS", "make_inputs", "run_op", "naive_op", "check_against_naive"]

VARIANTS = ("linear", "scalar", "gla", "delta", "gated_delta")


def make_inputs(
    variant, B, T, H, K, V, *, n_docs=None, dtype=torch.float64, seed=0, strong_gates=True
):
    """Random inputs; gates ``logsigmoid(randn)``-style, a share of them strongly negative.

    With ``n_docs`` the batch is one packed sequence (B must be 1) with uneven documents
    (``n_docs`` random cuts, or an explicit ``cu_seqlens`` list).
    """
    gen = torch.Generator().manual_seed(seed)

    def rn(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    x = {
        "q": rn(B, T, H, K),
        "k": rn(B, T, H, K) * K**-0.5,
        "v": rn(B, T, H, V),
    }
    if variant in ("scalar", "gated_delta"):
        g = F.logsigmoid(rn(B, T, H) + 2)
        if strong_gates:
            g = torch.where(rn(B, T, H) > 1.5, g - 6, g)
        x["g"] = g
    if variant == "gla":
        gk = F.logsigmoid(rn(B, T, H, K) + 2)
        if strong_gates:
            gk = torch.where(rn(B, T, H, K) > 1.5, gk - 6, gk)
        x["gk"] = gk
    if variant in ("delta", "gated_delta"):
        x["k"] = F.normalize(x["k"], dim=-1)
        x["beta"] = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
        if variant == "delta":
            x["g"] = None
    cu = None
    n_state = B
    if isinstance(n_docs, (list, tuple)):  # explicit cu_seqlens (may hold empty documents)
        assert B == 1 and n_docs[0] == 0 and n_docs[-1] == T
        cu = torch.tensor(n_docs, dtype=torch.long)
        n_state = len(n_docs) - 1
    elif n_docs is not None:
        assert B == 1 and n_docs <= T
        cuts = torch.randperm(T - 1, generator=gen)[: n_docs - 1] + 1
        cu = torch.cat([torch.zeros(1, dtype=torch.long), cuts.sort().values, torch.tensor([T])])
        n_state = n_docs
    x["initial_state"] = rn(n_state, H, K, V)
    x = {n: (t.to(dtype) if t is not None else None) for n, t in x.items()}
    return x, cu


def _call(mod, variant, x, cu, with_state=True, **kw):
    common = dict(
        initial_state=x["initial_state"] if with_state else None,
        output_final_state=with_state,
        cu_seqlens=cu,
        **kw,
    )
    if variant in ("linear", "scalar"):
        return mod.chunk_linear_attn(x["q"], x["k"], x["v"], x.get("g"), **common)
    if variant == "gla":
        return mod.chunk_gla(x["q"], x["k"], x["v"], x["gk"], **common)
    return mod.chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], **common)


class _NaiveNS:
    chunk_linear_attn = staticmethod(naive.naive_linear_attn)
    chunk_gla = staticmethod(naive.naive_gla)
    chunk_gated_delta_rule = staticmethod(naive.naive_gated_delta_rule)


def run_op(mod, variant, x, cu, **kw):
    """Call ``mod``'s op for ``variant``; returns ``(o, ht)``."""
    return _call(mod, variant, x, cu, **kw)


def naive_op(variant, x, cu, with_state=True):
    return _call(_NaiveNS, variant, x, cu, with_state)


def _grads(fn, x, seed, with_state=True, wdtype=torch.float64, frozen=()):
    """Forward + backward through a random loss on o and on ht; returns outputs and all grads.

    The loss weights are rounded to ``wdtype`` (the inputs' dtype), so that the op and its
    oracle see the same ones. Inputs named in ``frozen`` get no gradient (``fn`` takes them
    from its own inputs)."""
    leaves = {
        n: t.detach().clone().requires_grad_(True)
        for n, t in x.items()
        if t is not None and (with_state or n != "initial_state") and n not in frozen
    }
    o, ht = fn(leaves)
    gen = torch.Generator().manual_seed(seed + 1)
    wo = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(wdtype).to(o.dtype)
    loss = (o * wo).sum()
    if with_state:
        wh = torch.randn(ht.shape, generator=gen, dtype=torch.float64).to(wdtype).to(ht.dtype)
        loss = loss + (ht * wh).sum()
    else:
        assert ht is None
        ht = torch.ones(1)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return o.detach(), ht.detach(), dict(zip(leaves.keys(), grads))


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_against_naive(mod, variant, x, cu, *, tol, seed=0, with_state=True, frozen=(), **kw):
    """Assert forward, final state and every gradient of ``mod`` match the fp64 naive oracle.

    ``with_state=False`` calls both without initial_state and with output_final_state=False;
    inputs named in ``frozen`` (e.g. ``("g",)``) are passed without requiring a gradient.
    """
    x64 = {n: (t.double() if t is not None else None) for n, t in x.items()}
    wdt = x["q"].dtype
    ref = _grads(
        lambda xs: naive_op(variant, {**x64, **xs}, cu, with_state),
        x64,
        seed,
        with_state,
        wdt,
        frozen,
    )
    got = _grads(
        lambda xs: run_op(mod, variant, {**x, **xs}, cu, with_state=with_state, **kw),
        x,
        seed,
        with_state,
        wdt,
        frozen,
    )
    errs = {"o": rel_err(got[0], ref[0]), "ht": rel_err(got[1], ref[1])}
    for n in ref[2]:
        errs["d" + n] = rel_err(got[2][n], ref[2][n])
    for n, t in [("o", got[0]), ("ht", got[1]), *got[2].items()]:
        assert torch.isfinite(t).all(), f"{variant}: non-finite {n}"
    bad = {n: e for n, e in errs.items() if not e < tol}
    assert not bad, f"{variant}: relative errors over {tol}: {bad} (all: {errs})"
    return errs
