"""Sequence-parallel scaling of Linear-Llama3-1B (pure linear and 1/4 hybrid), batch 1.

Launch once on the GPUs of one host; every SP degree up to the world size runs in the same
launch (ranks outside a configuration's SP group wait)::

    torchrun --nproc_per_node=4 benchmarks/sp_scaling.py --out benchmarks/results/sp_scaling.json
    torchrun --nproc_per_node=4 benchmarks/sp_scaling.py --quick          # smoke test, ~1 min
    torchrun --nproc_per_node=4 benchmarks/sp_scaling.py --only weak-linear,strong-linear
    python benchmarks/sp_scaling.py --table benchmarks/results/sp_scaling.json   # README table

Groups: ``weak-*`` (32K tokens per GPU, sp = 1, 2, 4), ``strong-*`` (128K tokens in total),
``*-linear`` (layer pattern L; LASP-2 and the LASP-1 ring) and ``*-hybrid`` (LLLN; LASP-2 with
LASP-2H, contiguous and zigzag layouts). A training step is bf16 autocast with fp32 parameters,
full per-block activation checkpointing, chunked cross-entropy, a sum of gradients over the SP
group and fused AdamW. The gradient sum (``--grad-sync``, a comma list) is by default FSDP2 over
the SP group with the blocks kept gathered from forward to backward (``fsdp-keep``: one
all-gather per step, a reduce-scatter overlapped with the backward, and each GPU steps its
quarter of the optimizer; the trainer's ``parallel.fsdp: true`` with
``fsdp_reshard_after_forward: false``); ``fsdp`` gathers the blocks again for the backward,
``ddp`` keeps replicated parameters and all-reduces overlapped with the backward (the trainer
without FSDP), ``after`` all-reduces after it. Each configuration is timed three ways:

- ``step_s``: the real step (median of ``--steps``);
- ``step_nosp_s``: the same with the SP collectives replaced by local copies (wrong values,
  same compute); ``exposed_sp_comm = step_s - step_nosp_s``;
- ``step_nocomm_s``: also without the gradient sum (for FSDP rows: the same step on the
  unsharded model); its per-rank times give the load balance of the layout
  (``imbalance = slowest / fastest``).

Each row also records each rank's last loss of the three phases (``rank_losses``): the
references compute wrong values, and a non-finite one would make their timing meaningless.

MFU = model FLOPs / (step_s * sp * peak), with model FLOPs per step
``6 * N_params * tokens + 6 * n_softmax_layers * dim * T^2 * B`` (causal attention, forward
and backward, recomputation not counted; linear attention's own O(T d D) FLOPs left out) and
peak = 729 TFLOP/s, the measured H100 bf16 matmul ceiling (``--peak-tflops``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

from _device_env import disable_nvlink_multicast, environ  # benchmarks/ is sys.path[0]

disable_nvlink_multicast()  # before torch is imported

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.llama import LinearLlama  # noqa: E402
from models.presets import get_preset  # noqa: E402
from parallel._sp_comm import no_comm  # noqa: E402
from parallel.checkpointing import apply_activation_checkpointing  # noqa: E402
from parallel.data_parallel import (  # noqa: E402
    allreduce_gradients,
    apply_fsdp,
    reduce_dtype_of,
)
from parallel.ddp import apply_ddp  # noqa: E402
from parallel.sequence_parallel import (  # noqa: E402
    apply_sequence_parallel,
    remove_sequence_parallel,
)
from parallel.sequence_shard import shard_position_ids, shard_sequence  # noqa: E402

K = 1024
GRAD_SYNCS = ("ddp", "after", "fsdp", "fsdp-keep")


def configs(
    world: int,
    per_gpu: int,
    only: set[str] | None,
    hybrid_layouts: tuple[str, ...] = ("contiguous", "zigzag"),
    buckets: tuple[int, ...] = (25,),
    impls: tuple[str, ...] = ("lasp2", "lasp1"),
    grad_dtypes: tuple[str, ...] = ("fp32",),
    grad_syncs: tuple[str, ...] = ("ddp",),
) -> list[dict]:
    """Every configuration to run, in order (weak, then strong; linear, then hybrid); every SP
    row once per DDP bucket size in ``buckets``, gradient-sum dtype in ``grad_dtypes`` and
    gradient-sum method in ``grad_syncs`` (the first of each is the headline's)."""
    total = 4 * per_gpu
    sps = [s for s in (1, 2, 4) if s <= world]
    out = []
    for model in ("linear", "hybrid"):
        pairs = (
            [(i, "contiguous") for i in impls]
            if model == "linear"
            else [("lasp2", layout) for layout in hybrid_layouts]
        )
        for group, tokens in (("weak", lambda s: per_gpu * s), ("strong", lambda s: total)):
            name = f"{group}-{model}"
            if only and name not in only:
                continue
            for sp in sps:
                for impl, layout in pairs if sp > 1 else [("none", "contiguous")]:
                    variants = [
                        (b, d, g)
                        for g in (grad_syncs if sp > 1 else grad_syncs[:1])
                        for b in (buckets if sp > 1 else buckets[:1])
                        for d in (grad_dtypes if sp > 1 else grad_dtypes[:1])
                    ]
                    for bucket, grad_dtype, grad_sync in variants:
                        out.append(
                            {
                                "group": name,
                                "model": model,
                                "sp": sp,
                                "impl": impl,
                                "layout": layout,
                                "seq_len": tokens(sp),
                                "bucket_mb": bucket,
                                "grad_dtype": grad_dtype,
                                "grad_sync": grad_sync,
                            }
                        )
    return out


def model_args(model: str, size: str):
    """The LinearLlama arguments of a group's model (``linear``: pattern L, ``hybrid``: LLLN)."""
    pattern = "L" if model == "linear" else "LLLN"
    if size == "cpu":
        return get_preset("tiny", dim=64, n_layers=4, n_heads=2, ffn_dim=128, layer_pattern=pattern)
    if size == "quick":
        return get_preset(
            "linear-llama3-1b",
            dim=512,
            n_layers=4,
            n_heads=4,
            n_kv_heads=4,
            ffn_dim=1536,
            vocab_size=32000,
            layer_pattern=pattern,
        )
    return get_preset("linear-llama3-1b", layer_pattern=pattern)


def build_model(
    model: str, size: str, device, shard=None
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model with full per-block checkpointing and its fused AdamW; ``shard(m)``, when
    given, is applied (FSDP) before the optimizer is built on the resulting parameters."""
    torch.manual_seed(0)
    with torch.device(device):
        m = LinearLlama(model_args(model, size))
    apply_activation_checkpointing(m, mode="full")
    if shard is not None:
        shard(m)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-5, fused=device.type == "cuda")
    return m, opt


class ModelCache:
    """At most one model on the device: the unsharded model of the current group is reused
    from row to row; a sharded one is always fresh (FSDP cannot be undone) and evicts it."""

    def __init__(self, size: str, device):
        self.size, self.device = size, device
        self.kind: str | None = None
        self.built: tuple | None = None

    def clear(self) -> None:
        self.built = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def for_model(self, kind: str):
        """The ``get_model(shard=None)`` of ``run_config`` for model kind ``kind``."""

        def get_model(shard=None):
            if shard is not None:
                self.clear()
                return build_model(kind, self.size, self.device, shard)
            if self.built is None or self.kind != kind:
                self.clear()
                self.kind, self.built = kind, build_model(kind, self.size, self.device)
            return self.built

        return get_model


def model_flops(args, seq_len: int) -> float:
    """Model FLOPs of one step on one ``seq_len``-token sequence (the formula in the docstring;
    the parameters are counted on the meta device)."""
    with torch.device("meta"):
        n_params = sum(p.numel() for p in LinearLlama(args).parameters())
    n_softmax = args.layer_kinds().count("N")
    return 6.0 * n_params * seq_len + 6.0 * n_softmax * args.dim * seq_len**2


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    m,
    opt,
    batch,
    group,
    device,
    *,
    n: int,
    warmup: int,
    sp_comm: bool,
    grad_comm: bool,
    autocast: bool,
    ddp=None,
    grad_dtype: str = "fp32",
    fsdp: bool = False,
) -> tuple[list[float], float]:
    """Seconds per step on this rank (after ``warmup`` untimed steps) and the last step's loss
    (the reference runs without collectives compute wrong values: a non-finite loss there
    would make their kernels run on NaNs, whose timing is not representative).

    With ``ddp`` (a DistributedDataParallel wrapper of ``m`` over the SP group) the gradient
    sum overlaps the backward; with ``fsdp`` (``m`` sharded by FSDP2) its reduce-scatter does;
    otherwise it follows it (bucketed all-reduce).
    """
    tokens, labels, pos, total = batch
    params = [p for p in m.parameters()]
    reduce_dtype = reduce_dtype_of(grad_dtype)
    times = []
    for i in range(warmup + n):
        _sync(device)
        t0 = time.perf_counter()
        with contextlib.ExitStack() as stack:
            if not sp_comm:
                stack.enter_context(no_comm())
            if ddp is not None and not grad_comm:
                stack.enter_context(ddp.no_sync())
            stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast))
            hidden = (ddp or m)(tokens, position_ids=pos)
            loss = m.loss(hidden, labels) / total
            loss.backward()
        if grad_comm and group is not None and ddp is None and not fsdp:
            allreduce_gradients(params, group, reduce_dtype=reduce_dtype)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times, float(loss.detach())


def sp_batch(m, T: int, *, rank: int, sp: int, layout: str, device) -> tuple:
    """This rank's shard of one random T-token sequence (seed 1) as ``time_steps`` takes it:
    ``(tokens, labels, position_ids, T)``."""
    gen = torch.Generator(device=device).manual_seed(1)
    full = torch.randint(0, m.args.vocab_size, (1, T + 1), device=device, generator=gen)
    kw = {"rank": rank, "world": sp, "layout": layout}
    return (
        shard_sequence(full[:, :-1], dim=1, **kw),
        shard_sequence(full[:, 1:], dim=1, **kw),
        shard_position_ids(T, device=device, **kw),
        float(T),
    )


def run_config(cfg, get_model, rank, groups, args, device) -> dict:
    """Time one configuration on this rank. ``get_model(shard=None)`` returns the (cached,
    unsharded) model and optimizer, or with ``shard`` a fresh model sharded by it."""
    sp, layout = cfg["sp"], cfg["layout"]
    group = groups.get(sp)
    sync = cfg.get("grad_sync", "ddp") if sp > 1 else "none"

    def with_sp(m):
        remove_sequence_parallel(m)
        if sp > 1:
            apply_sequence_parallel(
                m,
                group=group,
                layout=layout,
                linear_impl="lasp1" if cfg["impl"] == "lasp1" else "lasp2",
                lasp2_schedule=args.lasp2_schedule,
            )
        return m

    def shard(m):
        # SP first, then FSDP2 over the SP group (the trainer's order, parallelize_model).
        from torch.distributed.device_mesh import DeviceMesh

        with_sp(m)
        apply_fsdp(
            m,
            DeviceMesh.from_group(group, device.type),
            reshard_after_forward=sync == "fsdp",
            reduce_dtype=reduce_dtype_of(cfg["grad_dtype"]),
        )

    fsdp = sync in ("fsdp", "fsdp-keep")
    m, opt = get_model(shard if fsdp else None)
    if not fsdp:
        with_sp(m)
    batch = sp_batch(m, cfg["seq_len"], rank=rank, sp=sp, layout=layout, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ddp = None
    if sync == "ddp":
        # The trainer's DDP (SUM comm hook), buckets of --bucket-mb.
        ddp = apply_ddp(
            m, group, bucket_mb=cfg["bucket_mb"], reduce_dtype=reduce_dtype_of(cfg["grad_dtype"])
        )
    common = {
        "group": group,
        "device": device,
        "autocast": device.type == "cuda",
        "ddp": ddp,
        "grad_dtype": cfg["grad_dtype"],
        "fsdp": fsdp,
    }
    real, loss_real = time_steps(
        m, opt, batch, n=args.steps, warmup=args.warmup, sp_comm=True, grad_comm=True, **common
    )
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else 0.0
    n_aux = max(2, args.steps // 2)
    nosp, loss_nosp = time_steps(
        m, opt, batch, n=n_aux, warmup=1, sp_comm=False, grad_comm=True, **common
    )
    if fsdp:
        # FSDP's collectives cannot be switched off: the compute-only reference runs on the
        # unsharded model (same compute; grad_comm=False below skips any gradient sum).
        del m, opt
        gc.collect()
        m, opt = get_model(None)
        with_sp(m)
    nocomm, loss_nocomm = time_steps(
        m, opt, batch, n=n_aux, warmup=1, sp_comm=False, grad_comm=False, **common
    )
    del ddp, common  # the reducer's gradient hooks go with it
    gc.collect()
    return {
        "step_s": statistics.median(real),
        "step_nosp_s": statistics.median(nosp),
        "step_nocomm_s": statistics.median(nocomm),
        "peak_mem_gb": peak,
        "loss": [loss_real, loss_nosp, loss_nocomm],
    }


def summarise(cfg: dict, per_rank: list[dict], flops: float, peak_tflops: float) -> dict:
    sp, T = cfg["sp"], cfg["seq_len"]
    step = max(r["step_s"] for r in per_rank)
    nosp = max(r["step_nosp_s"] for r in per_rank)
    compute = [r["step_nocomm_s"] for r in per_rank]
    row = dict(cfg)
    row.update(
        step_s=step,
        step_nosp_s=nosp,
        step_nocomm_s=max(compute),
        rank_compute_s=compute,
        imbalance=max(compute) / min(compute),
        exposed_sp_comm_s=step - nosp,
        exposed_sp_comm_pct=100 * (step - nosp) / step,
        exposed_all_comm_pct=100 * (step - max(compute)) / step,
        tokens_per_s=T / step,
        tokens_per_s_per_gpu=T / step / sp,
        mfu=flops / (step * sp * peak_tflops * 1e12),
        peak_mem_gb=max(r["peak_mem_gb"] for r in per_rank),
        rank_losses=[r["loss"] for r in per_rank],
    )
    return row


def print_row(r: dict) -> None:
    if "error" in r:
        print(
            f"{r['group']:14s} sp={r['sp']} {r['impl']:5s} {r['layout']:10s} "
            f"T={r['seq_len'] / K:.1f}K  ERROR {r['error'][:120]}",
            flush=True,
        )
        return
    print(
        f"{r['group']:14s} sp={r['sp']} {r['impl']:5s} {r['layout']:10s} "
        f"T={r['seq_len'] / K:5.1f}K step {r['step_s'] * 1e3:8.1f} ms  "
        f"{r['tokens_per_s']:9.0f} tok/s ({r['tokens_per_s_per_gpu']:7.0f}/GPU)  "
        f"MFU {r['mfu']:.3f}  mem {r['peak_mem_gb']:5.1f} GB  "
        f"exposed SP {r['exposed_sp_comm_pct']:5.2f}%  all {r['exposed_all_comm_pct']:5.2f}%  "
        f"imbalance {r['imbalance']:.3f}  bucket {r.get('bucket_mb', '-')} MB "
        f"grads {r.get('grad_dtype', 'fp32')} {r.get('grad_sync', 'ddp')}",
        flush=True,
    )


def headline(rows: list[dict]) -> dict:
    """Weak-scaling efficiency, LASP-2 / LASP-1 speed and worst exposed communication."""
    ok = [r for r in rows if "error" not in r]
    out: dict = {}

    # Rows of other bucket sizes, gradient dtypes or gradient-sum methods than the first SP
    # row's, and lasp2-sep rows, get their own efficiency entries; the rest uses the first.
    def variant(r):
        return r.get("bucket_mb"), r.get("grad_dtype", "fp32"), r.get("grad_sync", "ddp")

    sp_ok = [r for r in ok if r["sp"] > 1]
    first = variant(sp_ok[0]) if sp_ok else None
    for r in sp_ok:
        v = variant(r)
        base = next((x for x in ok if x["group"] == r["group"] and x["sp"] == 1), None)
        if (v != first or r["impl"] == "lasp2-sep") and base and r["impl"].startswith("lasp2"):
            kind = r["group"].split("-")[0]  # weak or strong
            key = f"{kind}_eff_{r['model']}_sp{r['sp']}_{r['layout']}"
            key += "_sep" if r["impl"] == "lasp2-sep" else ""
            key += f"_bucket{v[0]}" if v[0] != first[0] else ""
            key += f"_{v[1]}" if v[1] != first[1] else ""
            key += f"_{v[2]}" if v[2] != first[2] else ""
            out[key] = r["mfu"] / base["mfu"]
    ok = [r for r in ok if r["sp"] == 1 or variant(r) == first]
    for model in ("linear", "hybrid"):
        weak = {
            (r["sp"], r["layout"]): r
            for r in ok
            if r["group"] == f"weak-{model}" and r["impl"] in ("lasp2", "none")
        }
        base = weak.get((1, "contiguous"))
        for (sp, layout), r in sorted(weak.items()):
            if base and sp > 1:
                out[f"weak_eff_{model}_sp{sp}_{layout}"] = r["mfu"] / base["mfu"]
    for r in ok:
        if r["impl"] == "lasp1":
            twin = next(
                (
                    x
                    for x in ok
                    if x["group"] == r["group"] and x["sp"] == r["sp"] and x["impl"] == "lasp2"
                ),
                None,
            )
            if twin:
                out[f"lasp2_over_lasp1_{r['group']}_sp{r['sp']}"] = r["step_s"] / twin["step_s"]
    sp_rows = [r for r in ok if r["sp"] > 1]
    if sp_rows:
        out["max_exposed_sp_comm_pct"] = max(r["exposed_sp_comm_pct"] for r in sp_rows)
        zig = [r["imbalance"] for r in sp_rows if r["layout"] == "zigzag"]
        if zig:
            out["max_zigzag_imbalance"] = max(zig)
    return out


def markdown_table(path: str) -> str:
    """The README table of a results JSON (``--table``; no GPUs or torchrun needed)."""
    data = json.loads(Path(path).read_text())
    buckets = len({r.get("bucket_mb") for r in data["rows"]})
    dtypes = len({r.get("grad_dtype", "fp32") for r in data["rows"]})
    syncs = len({r.get("grad_sync", "ddp") for r in data["rows"] if r["sp"] > 1})
    lines = [
        f"{data['meta']['card']} x{data['meta']['world']}, torch {data['meta']['torch']}, "
        f"{data['meta']['date'][:10]}",
        "",
        "| group | sp | impl | layout | tokens | step ms | tok/s/GPU | MFU | peak GB "
        "| exposed SP comm % | imbalance |",
        "|" + "---|" * 11,
    ]
    for r in data["rows"]:
        if "error" in r:
            lines.append(
                f"| {r['group']} | {r['sp']} | {r['impl']} | {r['layout']} | "
                f"{r['seq_len'] // K}K | {r['error'][:40]} |||||||"
            )
            continue
        tags = []
        if buckets > 1 and r["sp"] > 1:
            tags.append(f"{r['bucket_mb']} MB")
        if dtypes > 1 and r["sp"] > 1:
            tags.append(f"{r.get('grad_dtype', 'fp32')} grads")
        if syncs > 1 and r["sp"] > 1:
            tags.append(r.get("grad_sync", "ddp"))
        impl = r["impl"] + (f" ({', '.join(tags)})" if tags else "")
        lines.append(
            f"| {r['group']} | {r['sp']} | {impl} | {r['layout']} | {r['seq_len'] // K}K | "
            f"{r['step_s'] * 1e3:.0f} | {r['tokens_per_s_per_gpu']:,.0f} | {r['mfu']:.3f} | "
            f"{r['peak_mem_gb']:.1f} | {r['exposed_sp_comm_pct']:.2f} | {r['imbalance']:.3f} |"
        )
    lines += [
        "",
        "Headline: " + ", ".join(f"{k} = {v:.3f}" for k, v in data.get("headline", {}).items()),
    ]
    return "\n".join(lines)


def main() -> None:
    if "--table" in sys.argv:
        print(markdown_table(sys.argv[sys.argv.index("--table") + 1]))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small model and 4K tokens per GPU")
    p.add_argument("--only", default="", help="comma list of groups, e.g. weak-linear")
    p.add_argument(
        "--hybrid-layouts",
        default="contiguous,zigzag",
        help="layouts of the hybrid groups' SP rows, e.g. zigzag",
    )
    p.add_argument(
        "--bucket-mb",
        default="25",
        help="DDP bucket size(s) in MB, e.g. 25,100,8000 (each SP row once per size; the "
        "first feeds the headline; a size over the model's gradients is one all-reduce at the "
        "end of the backward)",
    )
    p.add_argument(
        "--impls",
        default="lasp2,lasp1",
        help="linear groups' SP impls: lasp2, lasp2-sep (LASP-2 with its state products "
        "outside the op, LINSCALE_LASP2_FUSED=off), lasp1 (the ring)",
    )
    p.add_argument(
        "--grad-dtypes",
        default="fp32",
        help="dtype(s) of the gradient sum over the SP group, fp32 and/or bf16 (each SP row "
        "once per dtype; the first feeds the headline; bf16 = parallel.grad_reduce_dtype=bf16)",
    )
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=729.0)
    p.add_argument(
        "--grad-sync",
        default="fsdp-keep",
        help="gradient sum over the SP group, a comma list (each SP row once per method; the "
        "first feeds the headline): ddp (overlapped with the backward, the trainer without fsdp), "
        "after (a bucketed all-reduce after the backward), fsdp (FSDP2 over the SP group, "
        "parallel.fsdp: blocks gathered again for the backward), fsdp-keep (FSDP2, blocks kept "
        "gathered from forward to backward)",
    )
    p.add_argument(
        "--lasp2-schedule",
        choices=("overlap", "serial"),
        default="serial",
        help="LASP-2 for linear/scalar/GLA (default serial, as the trainer): overlap the intra "
        "op with the AllGather and add the cross term, or AllGather first and run the op once "
        "from the incoming state",
    )
    p.add_argument("--out", default=None, help="JSON file (rank 0 writes it after each row)")
    p.add_argument("--cpu", action="store_true", help="smoke-test the script on CPU (gloo)")
    args = p.parse_args()
    local = int(os.environ.get("LOCAL_RANK", 0))
    if args.cpu:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=dt.timedelta(seconds=600))
    else:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl", timeout=dt.timedelta(seconds=600), device_id=device)
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = {s: dist.new_group(list(range(s))) for s in (2, 4) if s <= world}
    only = {s for s in args.only.split(",") if s} or None
    meta = {
        "card": "cpu" if args.cpu else torch.cuda.get_device_name(device),
        "world": world,
        "torch": torch.__version__,
        "command": " ".join(["torchrun", *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(),
        "args": vars(args),
        "flops_formula": "6*N*tokens + 6*n_softmax*dim*T^2 (per step, batch 1)",
    }
    with contextlib.suppress(ImportError):
        import triton

        meta["triton"] = triton.__version__
    rows: list[dict] = []
    size = "cpu" if args.cpu else ("quick" if args.quick else "full")
    per_gpu = {"cpu": 64, "quick": 4 * K, "full": 32 * K}[size]
    layouts = tuple(x for x in args.hybrid_layouts.split(",") if x)
    bad = [x for x in layouts if x not in ("contiguous", "zigzag")]
    if bad or not layouts:
        raise SystemExit(
            f"--hybrid-layouts takes contiguous and/or zigzag, got {args.hybrid_layouts!r}"
        )
    try:
        buckets = tuple(int(b) for b in args.bucket_mb.split(","))
    except ValueError:
        buckets = ()
    impls = tuple(x for x in args.impls.split(",") if x)
    if not buckets or min(buckets) < 1:
        raise SystemExit(f"--bucket-mb takes positive integers, got {args.bucket_mb!r}")
    if not impls or set(impls) - {"lasp2", "lasp2-sep", "lasp1"}:
        raise SystemExit(f"--impls takes lasp2, lasp2-sep and/or lasp1, got {args.impls!r}")
    grad_dtypes = tuple(x for x in args.grad_dtypes.split(",") if x)
    if not grad_dtypes or set(grad_dtypes) - {"fp32", "bf16"}:
        raise SystemExit(f"--grad-dtypes takes fp32 and/or bf16, got {args.grad_dtypes!r}")
    grad_syncs = tuple(x for x in args.grad_sync.split(",") if x)
    if not grad_syncs or set(grad_syncs) - set(GRAD_SYNCS):
        raise SystemExit(
            f"--grad-sync takes a comma list of {', '.join(GRAD_SYNCS)}, got {args.grad_sync!r}"
        )
    cache = ModelCache(size, device)
    todo = configs(world, per_gpu, only, layouts, buckets, impls, grad_dtypes, grad_syncs)
    for cfg in todo:
        res: dict = {}
        if rank < cfg["sp"]:
            try:
                # lasp2-sep rows: LASP-2 with its state products outside the op.
                sep = cfg["impl"] == "lasp2-sep"
                with environ({"LINSCALE_LASP2_FUSED": "off"}) if sep else contextlib.nullcontext():
                    res = run_config(cfg, cache.for_model(cfg["model"]), rank, groups, args, device)
            except torch.cuda.OutOfMemoryError as e:  # sp = 1 only can be caught safely
                res = {"error": f"OOM: {str(e)[:200]}"}
                cache.clear()
        gathered = [None] * world
        dist.all_gather_object(gathered, res)
        if rank == 0:
            part = gathered[: cfg["sp"]]
            errs = [g["error"] for g in part if "error" in g]
            row = (
                dict(cfg, error=errs[0])
                if errs
                else summarise(
                    cfg,
                    part,
                    model_flops(model_args(cfg["model"], size), cfg["seq_len"]),
                    args.peak_tflops,
                )
            )
            rows.append(row)
            print_row(row)
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(
                    json.dumps({"meta": meta, "headline": headline(rows), "rows": rows}, indent=1)
                )
    if rank == 0:
        print(json.dumps(headline(rows), indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
