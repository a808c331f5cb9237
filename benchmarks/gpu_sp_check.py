"""bf16 multi-GPU correctness of LASP-2 / LASP-2H against the single-GPU run.

Run on one host with torchrun (every SP degree from 2 up to the world size that divides it
is checked in the same launch; each rank also computes the single-GPU result itself)::

    torchrun --nproc_per_node=4 benchmarks/gpu_sp_check.py \
        --out benchmarks/results/gpu_sp_check.json

For every variant (linear, scalar decay, GLA, gated delta rule) and layout, with bf16 inputs on
the Triton kernels: the output and every input gradient of LASP-2 on this rank's shard are
compared with an fp32 reference (the pure-torch chunked op on the whole sequence), and so is the
single-GPU bf16 run. A case passes when the SP error is at most ``2 x`` the single-GPU bf16
error (+2e-3): sequence parallelism must cost no accuracy beyond bf16 itself. LASP-2H (flash
blocks, GQA) is checked the same way against fp32 SDPA, and one bf16-autocast LinearLlama
forward/backward (hybrid LLLN, gated DeltaNet with short convs) against the same model on one GPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import sys
import time
import traceback
from pathlib import Path

from _device_env import disable_nvlink_multicast  # benchmarks/ is sys.path[0]

disable_nvlink_multicast()  # before torch is imported

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models.ops as ops  # noqa: E402
from parallel.lasp2 import lasp2_gated_delta_rule, lasp2_gla, lasp2_linear_attn  # noqa: E402
from parallel.lasp2h import lasp2h_attention  # noqa: E402
from parallel.sequence_shard import shard_position_ids, shard_sequence  # noqa: E402

VARIANTS = {  # name: (lasp2 op, chunk op, gates)
    "linear": (lasp2_linear_attn, ops.chunk_linear_attn, ()),
    "scalar": (lasp2_linear_attn, ops.chunk_linear_attn, ("g",)),
    "gla": (lasp2_gla, ops.chunk_gla, ("gk",)),
    "delta": (lasp2_gated_delta_rule, ops.chunk_gated_delta_rule, ("g", "beta")),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def inputs(variant: str, B: int, T: int, H: int, D: int, device) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(1234)
    rnd = lambda *s: torch.randn(*s, generator=gen, device=device)
    x = {"q": rnd(B, T, H, D), "k": rnd(B, T, H, D), "v": rnd(B, T, H, D)}
    if variant in ("linear", "scalar", "gla"):
        x["q"], x["k"] = F.silu(x["q"]) * 0.3, F.silu(x["k"]) * 0.3
    if variant == "scalar":
        x["g"] = F.logsigmoid(rnd(B, T, H) + 4)
    if variant == "gla":
        x["gk"] = F.logsigmoid(rnd(B, T, H, D) + 4)
    if variant == "delta":
        x["q"], x["k"] = F.normalize(x["q"], dim=-1), F.normalize(x["k"], dim=-1)
        x["g"] = F.logsigmoid(rnd(B, T, H) + 4)
        x["beta"] = torch.sigmoid(rnd(B, T, H))
    return x


def run_and_grads(fn, x: dict, w: torch.Tensor, dtype) -> tuple[torch.Tensor, dict]:
    loc = {
        k: t.to(dtype if k in ("q", "k", "v") else torch.float32).detach().requires_grad_()
        for k, t in x.items()
    }
    o = fn(**loc)
    (o.float() * w).sum().backward()
    return o.detach(), {k: t.grad for k, t in loc.items()}


def _verdict(shard, full, ref, single, sp) -> dict:
    """Errors of the single-GPU bf16 run and of the SP bf16 run against fp32, per tensor."""
    names = ["o", *full]
    pick = lambda res, n, sh: sh(res[0]) if n == "o" else sh(res[1][n])
    per = {
        n: (
            rel_err(pick(single, n, shard), pick(ref, n, shard)),
            rel_err(pick(sp, n, lambda t: t), pick(ref, n, shard)),
        )
        for n in names
    }
    e_single = max(v[0] for v in per.values())
    e_sp = max(v[1] for v in per.values())
    return {
        "err_single_bf16": e_single,
        "err_sp_bf16": e_sp,
        "per_tensor": {n: [round(a, 6), round(b, 6)] for n, (a, b) in per.items()},
        "ok": e_sp <= 2 * e_single + 2e-3,
    }


def check_variant(variant, layout, sp, rank, group, args, device, schedule=None) -> dict:
    """One op under LASP-2 (``schedule`` None: the function's default, overlap; "serial": the
    trainer's default, inside the Triton op for linear / scalar / GLA) against one GPU."""
    sp_op, chunk, gates = VARIANTS[variant]
    kw = {} if schedule is None else {"schedule": schedule}
    T = args.t_local * sp
    full = inputs(variant, 1, T, args.heads, args.head_dim, device)
    w = torch.randn(
        1,
        T,
        args.heads,
        args.head_dim,
        device=device,
        generator=torch.Generator(device=device).manual_seed(7),
    )
    call = lambda op: lambda q, k, v, **g: op(q, k, v, *[g[n] for n in gates] or [None])
    ref_op = functools.partial(chunk, backend="reference")
    o32, g32 = run_and_grads(call(lambda *a: ref_op(*a)[0]), full, w, torch.float32)
    o16, g16 = run_and_grads(call(lambda *a: chunk(*a)[0]), full, w, torch.bfloat16)
    shard = lambda t: shard_sequence(t, dim=1, rank=rank, world=sp, layout=layout)
    osp, gsp = run_and_grads(
        call(lambda *a: sp_op(*a, group=group, layout=layout, **kw)),
        {k: shard(t) for k, t in full.items()},
        shard(w),
        torch.bfloat16,
    )
    return _verdict(shard, full, (o32, g32), (o16, g16), (osp, gsp))


def check_lasp2h(layout, sp, rank, group, args, device) -> dict:
    T, hq, hkv, D = args.t_local * sp, args.heads, max(args.heads // 4, 1), args.head_dim
    gen = torch.Generator(device=device).manual_seed(3)
    full = {
        "q": torch.randn(1, T, hq, D, device=device, generator=gen),
        "k": torch.randn(1, T, hkv, D, device=device, generator=gen),
        "v": torch.randn(1, T, hkv, D, device=device, generator=gen),
    }
    w = torch.randn(1, T, hq, D, device=device, generator=gen)

    def single(q, k, v):
        rep = hq // hkv
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.repeat_interleave(rep, 2).transpose(1, 2),
            v.repeat_interleave(rep, 2).transpose(1, 2),
            is_causal=True,
        )
        return o.transpose(1, 2)

    o32, g32 = run_and_grads(single, full, w, torch.float32)
    o16, g16 = run_and_grads(single, full, w, torch.bfloat16)
    shard = lambda t: shard_sequence(t, dim=1, rank=rank, world=sp, layout=layout)
    osp, gsp = run_and_grads(
        lambda q, k, v: lasp2h_attention(q, k, v, group=group, layout=layout),
        {k: shard(t) for k, t in full.items()},
        shard(w),
        torch.bfloat16,
    )
    return _verdict(shard, full, (o32, g32), (o16, g16), (osp, gsp))


def check_model(variant, layout, sp, rank, group, args, device) -> dict:
    """bf16-autocast LinearLlama (LLLN): loss and gradients, SP vs the same model on one GPU."""
    from models.llama import LinearLlama, ModelArgs
    from parallel.sequence_parallel import apply_sequence_parallel

    margs = ModelArgs(
        dim=512,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=1024,
        vocab_size=1024,
        layer_pattern="LLLN",
        linear_variant=variant,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LinearLlama(margs)
    T = args.t_local * sp
    gen = torch.Generator(device=device).manual_seed(5)
    tokens = torch.randint(0, 1024, (1, T), device=device, generator=gen)
    labels = torch.randint(0, 1024, (1, T), device=device, generator=gen)

    def loss_grads(tok, lab, pos):
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model.loss(model(tok, position_ids=pos), lab) / T
        loss.backward()
        return loss.detach(), torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    loss1, grad1 = loss_grads(tokens, labels, None)
    apply_sequence_parallel(model, group=group, layout=layout, lasp2_schedule="serial")
    kw = {"rank": rank, "world": sp, "layout": layout}
    loss_sp, grad_sp = loss_grads(
        shard_sequence(tokens, dim=1, **kw),
        shard_sequence(labels, dim=1, **kw),
        shard_position_ids(T, device=device, **kw),
    )
    dist.all_reduce(loss_sp, group=group)
    dist.all_reduce(grad_sp, group=group)
    cos = float(F.cosine_similarity(grad1.double(), grad_sp.double(), dim=0))
    loss_err = abs(float(loss_sp) - float(loss1)) / abs(float(loss1))
    return {
        "loss_single": float(loss1),
        "loss_sp": float(loss_sp),
        "loss_rel_err": loss_err,
        "grad_cosine": cos,
        "ok": loss_err < 1e-2 and cos > 0.99,
    }


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--t-local",
        type=int,
        default=4000,
        help="tokens per rank (not a multiple of 64 on purpose)",
    )
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--out", default=None, help="JSON file (rank 0 writes it)")
    p.add_argument("--cpu", action="store_true", help="smoke-test the script on CPU with gloo")
    args = p.parse_args()
    local = int(os.environ.get("LOCAL_RANK", 0))
    if args.cpu:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=dt.timedelta(seconds=300))
    else:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl", timeout=dt.timedelta(seconds=300), device_id=device)
    rank, world = dist.get_rank(), dist.get_world_size()
    sps = [s for s in (2, 4, 8) if s <= world and world % s == 0]
    groups = {s: dist.new_group(list(range(s))) for s in sps}
    rows = []
    for sp in sps:
        cases = [
            (f"lasp2-{v}-{lay}", functools.partial(check_variant, v, lay))
            for v in VARIANTS
            for lay in ("contiguous", "zigzag")
        ]
        cases += [
            (
                f"lasp2-serial-{v}-{lay}",
                functools.partial(check_variant, v, lay, schedule="serial"),
            )
            for v in ("linear", "scalar", "gla")
            for lay in ("contiguous", "zigzag")
        ]
        cases += [
            (f"lasp2h-gqa-{lay}", functools.partial(check_lasp2h, lay))
            for lay in ("contiguous", "zigzag")
        ]
        cases += [
            (f"model-LLLN-{v}-{lay}", functools.partial(check_model, v, lay))
            for v in ("linear", "gated_deltanet")
            for lay in ("contiguous", "zigzag")
        ]
        for name, fn in cases:
            res: dict = {"case": name, "sp": sp}
            if rank < sp:
                t0 = time.perf_counter()
                try:
                    res.update(fn(sp, rank, groups[sp], args, device))
                except Exception:
                    res.update(ok=False, error=traceback.format_exc()[-1500:])
                res["seconds"] = round(time.perf_counter() - t0, 2)
            gathered = [None] * world
            dist.all_gather_object(gathered, res)
            if rank == 0:
                per_rank = [g for g in gathered[:sp]]
                row = {
                    "case": name,
                    "sp": sp,
                    "ok": all(g.get("ok") for g in per_rank),
                    "ranks": per_rank,
                }
                rows.append(row)
                worst = max(per_rank, key=lambda g: g.get("err_sp_bf16", 0.0))
                detail = {
                    k: v for k, v in worst.items() if k not in ("case", "sp", "ranks", "per_tensor")
                }
                print(f"sp={sp} {name:32s} {'ok  ' if row['ok'] else 'FAIL'} {detail}", flush=True)
    if rank == 0:
        card = "cpu" if args.cpu else torch.cuda.get_device_name()
        meta = {
            "card": card,
            "world": world,
            "torch": torch.__version__,
            "triton": _triton_version(),
            "command": " ".join(sys.argv),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(),
            "args": vars(args),
        }
        print(f"{sum(r['ok'] for r in rows)}/{len(rows)} cases ok")
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
