"""End to end on one GPU: linscale's trainer against a plain PyTorch baseline, same run.

The baseline is the same pure-linear Linear-Llama3-1B (16 layers, d 2048, 16 heads of 128,
SwiGLU 8192, vocab 128256 tied; SiLU feature map and per-head output RMSNorm as in
``models.layers.LinearAttention``) written directly in PyTorch on flash-linear-attention's
``chunk_linear_attn`` (normalize=False), with full per-layer checkpointing, a chunked
cross-entropy, fused AdamW and bf16 autocast over fp32 weights, batch 1. linscale runs its own
trainer (``launch.trainer.Trainer``) with the given activation-checkpointing modes.

MFU = 6 x params x tokens/s / peak (729 TFLOP/s measured bf16 on H100, shared/DESIGN.md).

    python benchmarks/e2e_trainer.py --seq-lens 16384,32768 --out benchmarks/results/e2e.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.loss import chunked_cross_entropy  # noqa: E402

PEAK = 729e12


class PlainBlock(nn.Module):
    def __init__(self, d: int, h: int, ffn: int) -> None:
        super().__init__()
        self.h, self.hd = h, d // h
        self.n1, self.n2 = nn.RMSNorm(d, eps=1e-5), nn.RMSNorm(d, eps=1e-5)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.on = nn.RMSNorm(self.hd, eps=1e-5)
        self.w13 = nn.Linear(d, 2 * ffn, bias=False)
        self.w2 = nn.Linear(ffn, d, bias=False)

    def forward(self, x):
        from fla.ops.linear_attn import chunk_linear_attn

        B, T, D = x.shape
        q, k, v = self.qkv(self.n1(x)).view(B, T, 3, self.h, self.hd).unbind(2)
        o, _ = chunk_linear_attn(F.silu(q), F.silu(k), v, scale=self.hd**-0.5, normalize=False)
        x = x + self.o(self.on(o).reshape(B, T, D))
        a, b = self.w13(self.n2(x)).chunk(2, dim=-1)
        return x + self.w2(F.silu(a) * b)


class PlainModel(nn.Module):
    def __init__(self, d=2048, layers=16, h=16, ffn=8192, vocab=128256) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(PlainBlock(d, h, ffn) for _ in range(layers))
        self.norm = nn.RMSNorm(d, eps=1e-5)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens, labels):
        x = self.emb(tokens)
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=False)
        h = self.norm(x)
        return chunked_cross_entropy(h.flatten(0, 1), self.emb.weight, labels.flatten())


def profile_one_step(step_fn, path: Path) -> None:
    """Write the 40 most expensive CUDA ops of one step to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step_fn()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table)


def timed_steps(step_fn, steps: int, warmup: int, profile: Path | None = None) -> dict:
    for _ in range(warmup):
        step_fn()
    if profile is not None:
        profile_one_step(step_fn, profile)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step_fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    peak = torch.cuda.max_memory_allocated() / 1e9
    return {"step_s": times[len(times) // 2], "peak_mem_gb": peak}


def run_baseline(T: int, steps: int, warmup: int, profile: Path | None) -> dict:
    torch.manual_seed(0)
    model = PlainModel().cuda()
    nparams = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    tokens = torch.randint(0, 256, (1, T), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(tokens, tokens) / T
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    r = timed_steps(step, steps, warmup, profile)
    return {**r, "params": nparams}


def run_linscale(T: int, ac: str, steps: int, warmup: int, profile: Path | None) -> dict:
    from launch.config import load_config
    from launch.trainer import Trainer

    spec, plus, extra = ac.partition("+")
    if plus and extra != "compile":
        raise SystemExit(f"--ac: {ac!r}: the only suffix is +compile")
    mode, _, every = spec.partition(":")
    cfg = load_config(
        None,
        [
            "model.preset=linear-llama3-1b",
            f"training.seq_len={T}",
            "training.batch_size=1",
            f"training.steps={steps + warmup + 1}",
            "checkpoint.enabled=false",
            "logging.progress=false",
            "logging.run_dir=/tmp/linscale_bench",
            f"parallel.activation_checkpointing={mode}",
            f"parallel.checkpoint_every={every or 2}",
            f"training.compile={'true' if plus else 'false'}",
        ],
    )
    tr = Trainer(cfg)
    r = timed_steps(tr.train_step, steps, warmup, profile)
    return {**r, "params": tr.num_params}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-lens", default="16384,32768")
    ap.add_argument(
        "--ac",
        default="full,partial:2,partial:4,none",
        help="linscale checkpointing modes to try (partial:N = one block in N; a +compile "
        "suffix, e.g. full+compile, also sets training.compile)",
    )
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/e2e_trainer.json")
    ap.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="also profile one step per run: top CUDA ops to DIR/<run>.txt",
    )
    ns = ap.parse_args()
    rows = []
    out = {
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
        "date": datetime.now(timezone.utc).isoformat(),
        "peak_tflops": PEAK / 1e12,
        "mfu_formula": "6 * params * tokens_per_s / peak",
        "rows": rows,
    }
    try:
        import fla

        out["fla"] = fla.__version__
    except ImportError:
        out["fla"] = None
    jobs = []
    for T in (int(t) for t in ns.seq_lens.split(",")):
        if not ns.skip_baseline and out["fla"]:
            jobs.append(("baseline", T, "full"))
        jobs += [("linscale", T, ac) for ac in ns.ac.split(",")]
    for name, T, ac in jobs:
        gc.collect()
        torch.cuda.empty_cache()
        tag = (
            f"baseline_{T}"
            if name == "baseline"
            else f"linscale_{T}_{ac.replace(':', '').replace('+', '_')}"
        )
        profile = Path(ns.profile) / f"{tag}.txt" if ns.profile else None
        try:
            r = (
                run_baseline(T, ns.steps, ns.warmup, profile)
                if name == "baseline"
                else run_linscale(T, ac, ns.steps, ns.warmup, profile)
            )
            tps = T / r["step_s"]
            row = {
                "name": name,
                "seq_len": T,
                "ac": ac,
                **r,
                "tokens_per_s": tps,
                "mfu": 6 * r["params"] * tps / PEAK,
            }
        except torch.OutOfMemoryError:
            row = {"name": name, "seq_len": T, "ac": ac, "oom": True}
        rows.append(row)
        print(json.dumps(row), flush=True)
        Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.out).write_text(json.dumps(out, indent=1))
    print(f"{'who':9} {'T':>6} {'ac':>10} {'tok/s':>9} {'MFU':>5} {'GB':>5}")
    for r in rows:
        if r.get("oom"):
            print(f"{r['name']:9} {r['seq_len']:>6} {r['ac']:>10}   OOM")
        else:
            print(
                f"{r['name']:9} {r['seq_len']:>6} {r['ac']:>10} {r['tokens_per_s']:>9,.0f} "
                f"{r['mfu']:>5.2f} {r['peak_mem_gb']:>5.1f}"
            )
    os.makedirs("/tmp/linscale_bench", exist_ok=True)


if __name__ == "__main__":
    main()
