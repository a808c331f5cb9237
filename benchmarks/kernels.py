"""Time linscale's Triton linear-attention kernels against flash-linear-attention in one run.

bf16, H = 16, K = V = 128; T = 8K x B 8 and 32K x B 2 (65,536 tokens), 128K x B 1 (131,072);
forward and forward+backward medians (``triton.testing.do_bench``), with the roofline of each
shape: FLOPs of the chunked algorithm (chunk 64) and the fewest bytes (inputs read once,
outputs written once), against the card's measured ceilings (shared/DESIGN.md).

    PYTHONPATH=. python benchmarks/kernels.py --out benchmarks/results/kernels_h100.json

Rows: ours ``linear`` (no decay), ``scalar`` (scalar decay), ``scalar_fixed`` (scalar decay
fixed per head, taking no gradient, passed expanded over B and T as the lightning / retention
layers pass it: the per-head kernels), ``scalar_fixed_tok`` (the same values materialised: the
per-token kernels; not in the default ``--ops``), ``gla``, ``gated_delta``; theirs
``fla_linear`` (``chunk_linear_attn``, normalize=False) and ``fla_gla`` (``chunk_gla``). fla's
scalar-decay and gated-delta kernels are not timed: they miscompile on Hopper with Triton 3.6.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

PEAK_TFLOPS = 729.0  # measured bf16 matmul, H100 80GB HBM3
PEAK_TBPS = 3.0  # measured device copy (read + write)
SHAPES = [(8, 8192), (2, 32768), (1, 131072)]
H, D, C = 16, 128, 64


def roofline(op: str, B: int, T: int) -> tuple[float, float, float, float]:
    """(fwd FLOPs, fwd+bwd FLOPs, fwd bytes, fwd+bwd bytes) for bf16 inputs."""
    n = B * T * H
    fwd = 2 * n * (C * D + C * D + 2 * D * D)  # q k^T, A v, q h, k^T v per chunk
    if op in ("gated_delta",):
        fwd += 2 * n * (C * D + C * C / 2 + C * (2 * D) + D * D)  # k k^T, solve, U/W, w h
    el = 2
    io = 3 * n * D  # q, k, v
    gates = {"linear": 0, "scalar": n, "gla": n * D, "gated_delta": 2 * n}.get(op, 0)
    fwd_bytes = (io + n * D) * el + gates * 4
    bwd_bytes = (io + n * D + 3 * n * D) * el + 2 * gates * 4  # re-read q k v do, write dq dk dv
    return fwd, 3 * fwd, fwd_bytes, fwd_bytes + bwd_bytes


def make(op: str, B: int, T: int, device="cuda"):
    torch.manual_seed(0)
    kw = dict(device=device, dtype=torch.bfloat16)
    q = torch.randn(B, T, H, D, **kw)
    k = torch.randn(B, T, H, D, **kw)
    v = torch.randn(B, T, H, D, **kw)
    extra = []
    if op in ("scalar", "gated_delta"):
        extra.append(F.logsigmoid(torch.randn(B, T, H, device=device)))
    if op in ("gla", "fla_gla"):
        extra.append((F.logsigmoid(torch.randn(B, T, H, D, device=device)) / 16).bfloat16())
    if op == "gated_delta":
        k = F.normalize(k.float(), dim=-1).bfloat16()
        extra.append(torch.rand(B, T, H, device=device).bfloat16())
    ts = [q, k, v, *extra]
    for t in ts:
        t.requires_grad_(True)
    if op in ("scalar_fixed", "scalar_fixed_tok"):
        # lightning's slopes, no gradient, expanded as the layer passes them (the per-head
        # kernels); "_tok": the same values materialised (the per-token kernels)
        from models.layers.linear_attention import fixed_decay

        g = fixed_decay("lightning", H).float().to(device).view(1, 1, H).expand(B, T, H)
        ts.append(g.contiguous() if op == "scalar_fixed_tok" else g)
    return ts


def op_fn(op: str):
    import models.ops as ops

    if op == "linear":
        return lambda q, k, v: ops.chunk_linear_attn(q, k, v, backend="triton")[0]
    if op in ("scalar", "scalar_fixed", "scalar_fixed_tok"):
        return lambda q, k, v, g: ops.chunk_linear_attn(q, k, v, g, backend="triton")[0]
    if op == "gla":
        return lambda q, k, v, g: ops.chunk_gla(q, k, v, g, backend="triton")[0]
    if op == "gated_delta":
        return lambda q, k, v, g, b: ops.chunk_gated_delta_rule(q, k, v, g, b, backend="triton")[0]
    if op == "fla_linear":
        from fla.ops.linear_attn import chunk_linear_attn

        return lambda q, k, v: chunk_linear_attn(q, k, v, normalize=False)[0]
    if op == "fla_gla":
        from fla.ops.gla import chunk_gla

        return lambda q, k, v, g: chunk_gla(q, k, v, g)[0]
    raise ValueError(op)


def bench(op: str, B: int, T: int) -> dict:
    from triton.testing import do_bench

    fn = op_fn(op)
    ts = make(op, B, T)
    do = torch.randn_like(ts[2])

    def fwd():
        with torch.no_grad():
            fn(*ts)

    leaves = [t for t in ts if t.requires_grad]

    def fwdbwd():
        o = fn(*ts)
        torch.autograd.grad(o, leaves, do)

    fwdbwd()  # compile + warm-up
    t_f = do_bench(fwd, warmup=25, rep=150, return_mode="median")
    t_fb = do_bench(fwdbwd, warmup=25, rep=250, return_mode="median")
    base = op.replace("fla_", "")
    fl_f, fl_fb, by_f, by_fb = roofline(base, B, T)
    return {
        "op": op,
        "B": B,
        "T": T,
        "H": H,
        "K": D,
        "V": D,
        "fwd_ms": t_f,
        "fwdbwd_ms": t_fb,
        "fwd_flops": fl_f,
        "fwdbwd_flops": fl_fb,
        "fwd_bytes": by_f,
        "fwdbwd_bytes": by_fb,
        "fwd_tflops": fl_f / t_f / 1e9,
        "fwdbwd_tflops": fl_fb / t_fb / 1e9,
        "fwd_tbps": by_f / t_f / 1e9,
        "fwdbwd_tbps": by_fb / t_fb / 1e9,
        "fwd_floor_ms": max(fl_f / PEAK_TFLOPS / 1e9, by_f / PEAK_TBPS / 1e9),
        "fwdbwd_floor_ms": max(fl_fb / PEAK_TFLOPS / 1e9, by_fb / PEAK_TBPS / 1e9),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="JSON path")
    ap.add_argument(
        "--ops", default="linear,fla_linear,scalar,scalar_fixed,gla,fla_gla,gated_delta"
    )
    ap.add_argument("--shapes", default="all", help="all, or e.g. 8192,131072")
    ap.add_argument(
        "--sweep-group-tokens",
        default="",
        help="e.g. 1024,4096: extra rows of ours at T=128K with these group sizes",
    )
    ap.add_argument(
        "--env-variants",
        default="",
        help="e.g. 'w4:LINSCALE_KERNEL_GATED_BWD_WARPS=4;b:A=1,B=2': extra rows of ours (those "
        "of --ops among linear, scalar, scalar_fixed(_tok) and gla, at the first shape) under "
        "these settings",
    )
    ap.add_argument(
        "--profile",
        default=None,
        help="write a per-kernel CUDA-time breakdown of ours at the first shape here",
    )
    args = ap.parse_args()
    shapes = (
        SHAPES
        if args.shapes == "all"
        else [s for s in SHAPES if str(s[1]) in args.shapes.split(",")]
    )
    rows = []
    t0 = time.time()

    def record(r):
        r["t_wall"] = time.time() - t0
        rows.append(r)
        torch.cuda.empty_cache()
        print(json.dumps(r), flush=True)
        if args.out:
            save(args.out, rows)

    for gt in filter(None, args.sweep_group_tokens.split(",")):
        os.environ["LINSCALE_KERNEL_GROUP_TOKENS"] = gt
        for op in ("linear", "scalar", "gla"):
            try:
                r = bench(op, 1, 131072)
            except Exception as exc:  # noqa: BLE001
                r = {"op": op, "B": 1, "T": 131072, "error": f"{type(exc).__name__}: {exc}"[:300]}
            r["op"] = f"{op}@gt{gt}"
            record(r)
        os.environ.pop("LINSCALE_KERNEL_GROUP_TOKENS")
    for var in filter(None, args.env_variants.split(";")):
        tag, settings = var.split(":", 1)
        pairs = [s.split("=", 1) for s in settings.split(",")]
        for name, val in pairs:
            os.environ[name] = val
        ours = ("linear", "scalar", "scalar_fixed", "scalar_fixed_tok", "gla")
        for op in [o for o in args.ops.split(",") if o in ours]:
            B, T = shapes[0]
            try:
                r = bench(op, B, T)
            except Exception as exc:  # noqa: BLE001
                r = {"op": op, "B": B, "T": T, "error": f"{type(exc).__name__}: {exc}"[:300]}
            r["op"] = f"{op}@{tag}"
            record(r)
        for name, _ in pairs:
            os.environ.pop(name)
    if args.profile:
        profile(
            args.profile, [o for o in args.ops.split(",") if not o.startswith("fla")], *shapes[0]
        )
    ops_list = args.ops.split(",")
    # ours first, theirs last: fla's autotuning takes minutes on a fresh machine
    order = [o for o in ops_list if not o.startswith("fla")] + [
        o for o in ops_list if o.startswith("fla")
    ]
    for op in order:
        for B, T in shapes:
            try:
                r = bench(op, B, T)
            except Exception as exc:  # noqa: BLE001 - record and go on with the other rows
                r = {"op": op, "B": B, "T": T, "error": f"{type(exc).__name__}: {exc}"[:300]}
            record(r)
    by = {(r["op"], r["T"]): r for r in rows if "error" not in r}
    print(
        f"\n{'op':<12}{'T':>7}{'fwd ms':>9}{'f+b ms':>9}{'f+b TF/s':>10}{'f+b TB/s':>10}"
        f"{'floor':>8}{'vs fla f':>10}{'vs fla fb':>10}"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['op']:<12}{r['T']:>7}  ERROR {r['error'][:60]}")
            continue
        theirs = by.get(({"linear": "fla_linear", "gla": "fla_gla"}.get(r["op"], ""), r["T"]))
        rf = f"{r['fwd_ms'] / theirs['fwd_ms']:.2f}" if theirs else "-"
        rfb = f"{r['fwdbwd_ms'] / theirs['fwdbwd_ms']:.2f}" if theirs else "-"
        print(
            f"{r['op']:<12}{r['T']:>7}{r['fwd_ms']:>9.3f}{r['fwdbwd_ms']:>9.3f}"
            f"{r['fwdbwd_tflops']:>10.1f}{r['fwdbwd_tbps']:>10.2f}{r['fwdbwd_floor_ms']:>8.3f}"
            f"{rf:>10}{rfb:>10}"
        )
    if args.out:
        save(args.out, rows)


def profile(path: str, ops: list, B: int, T: int) -> None:
    """One fwd+bwd per op under torch.profiler; the top kernels by CUDA time go to ``path``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    with open(path, "w") as f:
        for op in ops:
            try:
                fn, ts = op_fn(op), make(op, B, T)
                leaves = [t for t in ts if t.requires_grad]
                do = torch.randn_like(ts[2])
                for _ in range(2):
                    torch.autograd.grad(fn(*ts), leaves, do)
                torch.cuda.synchronize()
                with prof(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as p:
                    torch.autograd.grad(fn(*ts), leaves, do)
                    torch.cuda.synchronize()
                table = p.key_averages().table(sort_by="cuda_time_total", row_limit=14)
            except Exception as exc:  # noqa: BLE001
                table = f"{type(exc).__name__}: {exc}"
            f.write(f"== {op} B={B} T={T}\n{table}\n")
            torch.cuda.empty_cache()


def save(path: str, rows: list) -> None:
    try:
        import fla

        fla_v = getattr(fla, "__version__", "?")
    except ImportError:
        fla_v = None
    import triton

    meta = {
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "fla": fla_v,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(),
        "ceilings": {"bf16_tflops": PEAK_TFLOPS, "copy_tbps": PEAK_TBPS},
    }
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
