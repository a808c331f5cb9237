"""Where a DDP gradient sum's cost goes at sp = 2: a plain NCCL all-reduce of the model's
gradient bytes in fp32 and bf16, and one profiled LASP-2 training step with the gradient sum
(synced) and without it (``no_sync``), per ``parallel.grad_reduce_dtype``.

linear-llama3-1b, 32K tokens per GPU, batch 1, bf16 autocast, full checkpointing, LASP-2
serial over both GPUs (the sp = 2 row of ``sp_scaling.py --only weak-linear``). Run on two
GPUs of one host::

    torchrun --nproc_per_node=2 benchmarks/ddp_profile.py --out $OUT/ddp_profile.json

Per mode: the timed step times and the CUDA kernel time by kind (NCCL, GEMM, Triton, other),
plus the top kernels of each profiled step in ``<out>.<mode>.txt``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

from _device_env import disable_nvlink_multicast  # benchmarks/ is sys.path[0]

disable_nvlink_multicast()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sp_scaling as S  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from parallel.data_parallel import reduce_dtype_of  # noqa: E402
from parallel.ddp import apply_ddp  # noqa: E402

GEMM = ("gemm", "cutlass", "nvjet", "sm90_xmma")


def kind(name: str) -> str:
    n = name.lower()
    if "nccl" in n:
        return "nccl"
    if any(g in n for g in GEMM):
        return "gemm"
    if "at::native" in n or n.startswith(("void", "memcpy", "memset")):
        return "other"
    return "triton"


def allreduce_ms(n: int, dtype: torch.dtype, device) -> float:
    x = torch.ones(n, device=device, dtype=dtype)
    for _ in range(2):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(3):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / 3 * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--modes", default="fp32,bf16", help="grad_reduce_dtype values")
    args = ap.parse_args()
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    device = torch.device("cuda", local)
    dist.init_process_group("nccl", timeout=dt.timedelta(seconds=600), device_id=device)
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != 2:
        raise SystemExit("ddp_profile.py runs on exactly 2 GPUs (torchrun --nproc_per_node=2)")
    m, opt = S.build_model("linear", "full", device)
    n_grad = sum(p.numel() for p in m.parameters())
    res: dict = {
        "card": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(),
        "command": " ".join(["torchrun --nproc_per_node=2", *sys.argv]),
        "grad_elements": n_grad,
    }
    for dtype in (torch.float32, torch.bfloat16):
        ms = allreduce_ms(n_grad, dtype, device)
        res[f"allreduce_{str(dtype)[6:]}_ms"] = ms
        res[f"allreduce_{str(dtype)[6:]}_GBps"] = n_grad * dtype.itemsize / ms / 1e6
    torch.cuda.empty_cache()
    S.apply_sequence_parallel(
        m, group=dist.group.WORLD, layout="contiguous", linear_impl="lasp2", lasp2_schedule="serial"
    )
    batch = S.sp_batch(m, 2 * 32 * S.K, rank=rank, sp=2, layout="contiguous", device=device)
    for mode in args.modes.split(","):
        ddp = apply_ddp(m, dist.group.WORLD, bucket_mb=25, reduce_dtype=reduce_dtype_of(mode))
        common = {"group": dist.group.WORLD, "device": device, "autocast": True, "ddp": ddp}
        for sync in (True, False):
            steps, _ = S.time_steps(
                m, opt, batch, n=2, warmup=1, sp_comm=True, grad_comm=sync, **common
            )
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                S.time_steps(m, opt, batch, n=1, warmup=0, sp_comm=True, grad_comm=sync, **common)
            table = prof.key_averages()
            by_kind: dict[str, float] = {"nccl": 0.0, "gemm": 0.0, "triton": 0.0, "other": 0.0}
            for e in table:
                by_kind[kind(e.key)] += e.self_device_time_total / 1e3
            key = f"{mode}_{'sync' if sync else 'nosync'}"
            res[key] = {"step_ms": [x * 1e3 for x in steps], "kernel_ms_by_kind": by_kind}
            if rank == 0:
                print(key, json.dumps(res[key]), flush=True)
                Path(f"{args.out}.{key}.txt").write_text(
                    table.table(
                        sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=80
                    )
                )
        del ddp
    if rank == 0:
        Path(args.out).write_text(json.dumps(res, indent=1))
        print(json.dumps({k: v for k, v in res.items() if k.startswith("allreduce")}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
