"""Causal/full softmax attention blocks on one GPU: SDPA's default choice against its flash, cuDNN
and memory-efficient backends, and the merged-LSE backward of LASP-2H per backend.

Why LASP-2H's blocks default to cuDNN on Hopper: at sp = 1 the hybrid model's softmax layers
run ``scaled_dot_product_attention``, which picks cuDNN on an H100, so LASP-2H's blocks must run
the same kernel for weak scaling to compare like with like. Run on the device machine::

    PYTHONPATH=. python benchmarks/attn_backends.py --out $OUT/attn_backends.json

Timing rows (bf16, B 1, H 16, D 128; medians of ``triton.testing.do_bench``): ``fwd_ms``,
``fb_ms`` (forward+backward) and TFLOP/s with ``4 B H Tq Tk D`` forward FLOPs (halved when
causal) and 3.5x that for forward+backward. Merge rows: a 4K-token query slice against its own
keys (causal) and 8K earlier keys (full), merged by LSE, each block's backward from the merged
output and LSE (``parallel.lasp2h``'s block functions), relative errors against fp32 attention.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parallel import lasp2h  # noqa: E402

B, H, D = 1, 16, 128
BACKENDS = {
    "default": None,
    "flash": "FLASH_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
}


def time_block(T: int, causal: bool, backend: str | None) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    q, k, v = (
        torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    )

    def fwd():
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        with sdpa_kernel([getattr(SDPBackend, backend)]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    do = torch.randn_like(fwd())

    def fwd_bwd():
        torch.autograd.grad(fwd(), (q, k, v), do)

    flops = 4 * B * H * T * T * D * (0.5 if causal else 1.0)
    t_f = do_bench(fwd, warmup=5, rep=50)
    t_fb = do_bench(fwd_bwd, warmup=5, rep=50)
    return {
        "fwd_ms": t_f,
        "fb_ms": t_fb,
        "fwd_tflops": flops / t_f / 1e9,
        "fb_tflops": 3.5 * flops / t_fb / 1e9,
    }


def merged_errors(backend: str, tq: int = 4096, device: str = "cuda") -> dict:
    """Relative errors of the LSE-merged diagonal + past blocks against fp32 attention."""
    before = os.environ.get("LINSCALE_LASP2H_BACKEND")
    os.environ["LINSCALE_LASP2H_BACKEND"] = backend
    try:
        return _merged_errors(tq, device)
    finally:
        if before is None:
            del os.environ["LINSCALE_LASP2H_BACKEND"]
        else:
            os.environ["LINSCALE_LASP2H_BACKEND"] = before


def _merged_errors(tq: int, device: str) -> dict:
    gen = torch.Generator(device=device).manual_seed(1)

    def rn(t):
        return torch.randn(B, t, H, D, device=device, generator=gen).bfloat16()

    q, do, k, v = rn(tq), rn(tq), rn(3 * tq), rn(3 * tq)
    past, scale = 2 * tq, D**-0.5
    o_d, l_d, a_d = lasp2h.attention_block_forward(
        q, k[:, past:], v[:, past:], causal=True, scale=scale
    )
    o_p, l_p, a_p = lasp2h.attention_block_forward(
        q, k[:, :past], v[:, :past], causal=False, scale=scale
    )
    o, lse = lasp2h._merge(o_d, l_d, o_p, l_p)
    g_d = lasp2h.attention_block_backward(
        do, q, k[:, past:], v[:, past:], o, lse, a_d, causal=True, scale=scale
    )
    g_p = lasp2h.attention_block_backward(
        do, q, k[:, :past], v[:, :past], o, lse, a_p, causal=False, scale=scale
    )
    got = (o, g_d[0] + g_p[0], torch.cat([g_p[1], g_d[1]], 1), torch.cat([g_p[2], g_d[2]], 1))
    qr, kr, vr = (t.float().requires_grad_() for t in (q, k, v))
    allowed = torch.ones(tq, 3 * tq, dtype=torch.bool, device=device).tril(past)
    s = (qr.transpose(1, 2) @ kr.permute(0, 2, 3, 1)) * scale
    ref_o = (
        torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ vr.transpose(1, 2)
    ).transpose(1, 2)
    ref = (ref_o, *torch.autograd.grad(ref_o, (qr, kr, vr), do.float()))
    return {
        n: ((a.float() - b).norm() / b.norm()).item()
        for n, a, b in zip(("o", "dq", "dk", "dv"), got, ref)
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="JSON path")
    ap.add_argument(
        "--cpu",
        action="store_true",
        help="smoke test: merge rows only (flash CPU, math), 64 tokens",
    )
    args = ap.parse_args()
    if args.cpu:
        print(json.dumps({b: merged_errors(b, 64, "cpu") for b in ("flash", "math")}))
        return
    if not torch.cuda.is_available():
        raise SystemExit("attn_backends.py needs a CUDA GPU (or --cpu for the smoke test)")
    rows = []
    for T, causal in ((32768, True), (32768, False), (8192, True)):
        for name, backend in BACKENDS.items():
            try:
                r = time_block(T, causal, backend)
            except RuntimeError as exc:  # a backend that does not take this shape
                r = {"error": str(exc)[:200]}
            rows.append({"T": T, "causal": causal, "backend": name, **r})
            print(json.dumps(rows[-1]), flush=True)
    merges = {b: merged_errors(b) for b in ("cudnn", "flash")}
    print(json.dumps(merges), flush=True)
    meta = {
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "command": " ".join(["python", *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(),
        "shape": {"B": B, "H": H, "D": D, "dtype": "bfloat16"},
    }
    if args.out:
        Path(args.out).write_text(
            json.dumps({"meta": meta, "rows": rows, "merge": merges}, indent=1)
        )


if __name__ == "__main__":
    main()
