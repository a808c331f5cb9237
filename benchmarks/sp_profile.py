"""Where one sequence-parallel training step waits: a profiled step of ``sp_scaling.py``'s
weak pure-linear row at sp = world (32K tokens per GPU, LASP-2 serial, FSDP2 over the SP group
with blocks kept gathered), summarised per rank as the busy time of each CUDA stream, the
largest idle gaps of the compute stream (with the kernels around them) and the NCCL kernel time.

    torchrun --nproc_per_node=4 benchmarks/sp_profile.py --out $OUT    # writes prof_rank<r>.txt
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from _device_env import disable_nvlink_multicast  # benchmarks/ is sys.path[0]

disable_nvlink_multicast()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sp_scaling as S  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.device_mesh import DeviceMesh  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from parallel.data_parallel import apply_fsdp  # noqa: E402
from parallel.sequence_parallel import apply_sequence_parallel  # noqa: E402


def summarise(trace: dict, rank: int, step_ms: list[float], top: int = 25) -> list[str]:
    """Stream busy times, the ``top`` largest gaps (> 30 us) of the compute stream, NCCL time."""
    kernels = [e for e in trace["traceEvents"] if e.get("cat") == "kernel"]
    streams: dict = {}
    for e in kernels:
        streams.setdefault(e["tid"], []).append(e)
    lines = [f"rank {rank} step ms {[round(x, 1) for x in step_ms]}"]
    for tid, es in streams.items():
        es.sort(key=lambda e: e["ts"])
        busy = sum(e["dur"] for e in es)
        span = es[-1]["ts"] + es[-1]["dur"] - es[0]["ts"]
        lines.append(
            f"stream {tid}: {len(es)} kernels, busy {busy / 1e3:.1f} ms, span {span / 1e3:.1f} ms"
        )
    # The compute stream: the busiest one that runs more than NCCL kernels.
    compute = [s for s, es in streams.items() if any("nccl" not in e["name"].lower() for e in es)]
    main = max(compute, key=lambda s: sum(e["dur"] for e in streams[s]))
    es = streams[main]
    gaps = []
    for a, b in zip(es, es[1:]):
        g = b["ts"] - (a["ts"] + a["dur"])
        if g > 30:
            gaps.append((g, a["ts"] - es[0]["ts"], a["name"][:60], b["name"][:60]))
    gaps.sort(reverse=True)
    lines.append(
        f"compute stream {main}: gaps > 30 us {sum(g[0] for g in gaps) / 1e3:.1f} ms in {len(gaps)}"
    )
    for g, at, before, after in gaps[:top]:
        lines.append(
            f"  gap {g / 1e3:6.2f} ms at {at / 1e3:7.1f} ms after {before} -> before {after}"
        )
    nccl: dict = {}
    for e in kernels:
        if "nccl" in e["name"].lower():
            n = e["name"].split("(")[0][:50]
            c = nccl.setdefault(n, [0, 0.0])
            c[0] += 1
            c[1] += e["dur"]
    for n, (c, d) in sorted(nccl.items(), key=lambda x: -x[1][1]):
        lines.append(f"  nccl {n}: {c} x, {d / 1e3:.1f} ms")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=".", help="folder for prof_rank<r>.txt")
    args = p.parse_args()
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    device = torch.device("cuda", local)
    dist.init_process_group("nccl", device_id=device)
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD

    def shard(m):
        apply_sequence_parallel(m, group=group, layout="contiguous", lasp2_schedule="serial")
        apply_fsdp(m, DeviceMesh.from_group(group, "cuda"), reshard_after_forward=False)

    m, opt = S.build_model("linear", "full", device, shard)
    batch = S.sp_batch(
        m, 32 * 1024 * world, rank=rank, sp=world, layout="contiguous", device=device
    )
    kw = dict(group=group, device=device, autocast=True, fsdp=True, sp_comm=True, grad_comm=True)
    times, _ = S.time_steps(m, opt, batch, n=3, warmup=2, **kw)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        S.time_steps(m, opt, batch, n=1, warmup=0, **kw)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
    lines = summarise(trace, rank, [t * 1e3 for t in times])
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"prof_rank{rank}.txt").write_text("\n".join(lines) + "\n")
    if rank == 0:
        print("\n".join(lines))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
