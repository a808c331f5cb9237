"""GPU smoke check and timing of the Triton gated delta rule (one CUDA device, bf16 inputs).

For each shape (H = 16, K = V = 128, 65,536 tokens: B = 8 x T = 8K, B = 1 x T = 128K, and one
packed batch of uneven documents) it checks the output, the final state and every gradient
of ``models.ops.chunk_gated_delta_rule(..., backend="triton")`` against the fp32 pure-torch
reference (relative error ``||a - b|| / ||b||``), then times forward and forward+backward with
``triton.testing.do_bench`` next to the no-decay ``chunk_linear_attn`` of the same shape::

    PYTHONPATH=. python benchmarks/delta_quick.py --out /tmp/delta_quick.json

Options: ``--shapes 8x8192,2x32768,1x131072,varlen`` (any subset; default all but 2x32768),
``--no-check``, ``--no-time``, ``--env-variants 'name:VAR=val,VAR2=val;name2:VAR=val'``
(repeatable): after the default settings, check and time each shape again with those
``LINSCALE_DELTA_*`` settings. The op reads them at every call and every one is a launch
parameter or constexpr (part of Triton's
kernel cache key), so setting ``os.environ`` between calls in one process is enough.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time

import torch
import torch.nn.functional as F
from _device_env import environ  # benchmarks/ is sys.path[0]

H, D = 16, 128
NAMES = ("o", "ht", "dq", "dk", "dv", "dg", "dbeta", "dh0")


def make(B: int, T: int, n_docs: int | None, seed: int = 0):
    """bf16 q, k (L2-normalised), v; fp32 log gates (some strong) and beta; fp32 h0."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    kw = dict(device="cuda", generator=gen)
    q = torch.randn(B, T, H, D, **kw).bfloat16()
    k = F.normalize(torch.randn(B, T, H, D, **kw), dim=-1).bfloat16()
    v = torch.randn(B, T, H, D, **kw).bfloat16()
    g = F.logsigmoid(torch.randn(B, T, H, **kw) + 2)
    g = torch.where(torch.rand(B, T, H, **kw) < 0.05, g - 4, g)
    beta = torch.sigmoid(torch.randn(B, T, H, **kw))
    cu = None
    n = B
    if n_docs:
        cuts = torch.randperm(T - 1, device="cuda", generator=gen)[: n_docs - 1] + 1
        zero = torch.zeros(1, dtype=torch.long, device="cuda")
        end = torch.full((1,), T, dtype=torch.long, device="cuda")
        cu = torch.cat([zero, cuts.sort().values, end]).to(torch.int32)
        n = n_docs
    h0 = torch.randn(n, H, D, D, **kw) * 0.1
    return dict(q=q, k=k, v=v, g=g, beta=beta, initial_state=h0), cu


def run(fn, x, cu, wo, wh):
    """Forward and backward through ``(o * wo).sum() + (ht * wh).sum()``; outputs and grads."""
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in x.items()}
    o, ht = fn(
        leaves["q"],
        leaves["k"],
        leaves["v"],
        leaves["g"],
        leaves["beta"],
        initial_state=leaves["initial_state"],
        output_final_state=True,
        cu_seqlens=cu,
    )
    ((o.float() * wo).sum() + (ht * wh).sum()).backward()
    gr = {n: leaves[m].grad for n, m in zip(NAMES[2:], ("q", "k", "v", "g", "beta"))}
    return {"o": o.detach(), "ht": ht.detach(), **gr, "dh0": leaves["initial_state"].grad}


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(x, cu) -> dict:
    from models import ops
    from models.ops import reference

    gen = torch.Generator(device="cuda").manual_seed(1)
    wo = torch.randn(x["v"].shape, device="cuda", generator=gen)
    wh = torch.randn(x["initial_state"].shape, device="cuda", generator=gen)

    def ours(*a, **kw):
        return ops.chunk_gated_delta_rule(*a, backend="triton", **kw)

    got = run(ours, x, cu, wo, wh)
    torch.backends.cuda.matmul.allow_tf32 = False
    x32 = {n: t.float() for n, t in x.items()}
    want = run(reference.chunk_gated_delta_rule, x32, cu, wo, wh)
    errs = {n: rel(got[n], want[n]) for n in NAMES}
    errs["finite"] = all(bool(torch.isfinite(t).all()) for t in got.values())
    del got, want
    torch.cuda.empty_cache()
    return errs


def bench(x, cu) -> dict:
    from triton.testing import do_bench

    from models import ops

    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in x.items()}
    do = torch.randn_like(x["v"])
    L = leaves

    def delta_fwd():
        return ops.chunk_gated_delta_rule(
            L["q"], L["k"], L["v"], L["g"], L["beta"], initial_state=L["initial_state"],
            output_final_state=True, cu_seqlens=cu, backend="triton",
        )  # fmt: skip

    def lin_fwd():
        return ops.chunk_linear_attn(
            L["q"], L["k"], L["v"], initial_state=L["initial_state"], output_final_state=True,
            cu_seqlens=cu, backend="triton",
        )  # fmt: skip

    def both(f):
        def step():
            o, _ = f()
            o.backward(do)

        return step

    gn = list(leaves.values())
    out = {}
    with torch.no_grad():
        out["delta_fwd_ms"] = do_bench(delta_fwd, warmup=10, rep=50)
        out["linear_fwd_ms"] = do_bench(lin_fwd, warmup=10, rep=50)
    out["delta_fwdbwd_ms"] = do_bench(both(delta_fwd), warmup=10, rep=50, grad_to_none=gn)
    out["linear_fwdbwd_ms"] = do_bench(both(lin_fwd), warmup=10, rep=50, grad_to_none=gn)
    out["ratio_fwdbwd"] = out["delta_fwdbwd_ms"] / out["linear_fwdbwd_ms"]
    out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def parse_variants(specs: list[str]) -> list[tuple[str, dict]]:
    """``'name:VAR=val,VAR2=val;name2:...'`` (each spec may hold several ``;``-separated
    variants) -> ``[("default", {}), (name, {VAR: val, ...}), ...]``."""
    out = [("default", {})]
    for spec in specs:
        for item in filter(None, (x.strip() for x in spec.split(";"))):
            name, sep, body = item.partition(":")
            if not sep or not name:
                raise SystemExit(f"--env-variants: expected 'name:VAR=val,...', got {item!r}")
            env = {}
            for kv in filter(None, (x.strip() for x in body.split(","))):
                var, eq, val = kv.partition("=")
                if not eq or not var:
                    raise SystemExit(f"--env-variants: expected VAR=val in {item!r}, got {kv!r}")
                env[var] = val
            out.append((name, env))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--shapes", default="8x8192,1x131072,varlen")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-time", action="store_true")
    ap.add_argument("--env-variants", action="append", default=[], metavar="SPEC")
    args = ap.parse_args()
    variants = parse_variants(args.env_variants)
    import triton

    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    shapes = {
        "8x8192": (8, 8192, None),
        "2x32768": (2, 32768, None),
        "1x131072": (1, 131072, None),
        "varlen": (1, 65536, 37),
    }
    rows = []
    for name in args.shapes.split(","):
        B, T, nd = shapes[name]
        x, cu = make(B, T, nd)
        for vname, env in variants:
            row = {"shape": name, "variant": vname, "env": env, "B": B, "T": T, "n_docs": nd}
            t0 = time.time()
            with environ(env):
                if not args.no_check:
                    row["err"] = check(x, cu)
                if not args.no_time:
                    torch.cuda.reset_peak_memory_stats()
                    row.update(bench(x, cu))
            row["wall_s"] = time.time() - t0
            rows.append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
        del x
        torch.cuda.empty_cache()
    head = " ".join(f"{n:>8}" for n in NAMES)
    print(f"\n{'shape':>9} {'variant':>12} {head}  fwd ms  f+b ms  lin f+b  ratio")
    for r in rows:
        e = r.get("err", {})
        errs = " ".join(f"{e[n]:8.1e}" if n in e else f"{'-':>8}" for n in NAMES)
        t = (
            f"{r['delta_fwd_ms']:7.2f} {r['delta_fwdbwd_ms']:7.2f} {r['linear_fwdbwd_ms']:8.2f}"
            f" {r['ratio_fwdbwd']:6.2f}"
            if "delta_fwd_ms" in r
            else ""
        )
        print(f"{r['shape']:>9} {r['variant'][:12]:>12} {errs}  {t}")
    meta = {
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "H": H,
        "K": D,
        "V": D,
        "dtype": "bfloat16",
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
