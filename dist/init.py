"""Process-group initialisation from torchrun's environment or from SLURM's (srun alone).

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Under ``srun`` with
one task per GPU and no torchrun, the same facts come from SLURM_PROCID, SLURM_NTASKS,
SLURM_LOCALID and the job's node list; the master is the first node and the port is derived
from the job id so that concurrent jobs on one node do not collide.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = [
    "DistEnv",
    "destroy_distributed",
    "first_slurm_host",
    "init_distributed",
    "read_dist_env",
]


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm" or "single"


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list such as ``gpu[003-005,010],cpu1`` -> ``gpu003``."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot read SLURM node list {nodelist!r}")
    prefix, _, ranges = m.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def read_dist_env(environ: dict | None = None) -> DistEnv:
    """Work out rank and world from torchrun's or SLURM's variables (single process if none)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            int(env["RANK"]),
            int(env["WORLD_SIZE"]),
            int(env.get("LOCAL_RANK", 0)),
            env.get("MASTER_ADDR", "127.0.0.1"),
            int(env.get("MASTER_PORT", 29500)),
            "torchrun",
        )
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1")
        port = int(env.get("MASTER_PORT", 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        return DistEnv(
            int(env["SLURM_PROCID"]),
            int(env["SLURM_NTASKS"]),
            int(env.get("SLURM_LOCALID", 0)),
            env.get("MASTER_ADDR") or first_slurm_host(nodelist),
            port,
            "slurm",
        )
    return DistEnv(0, 1, 0, "127.0.0.1", 29500, "single")


def init_distributed(*, device_type: str, timeout_s: float = 600.0) -> DistEnv:
    """Initialise the default process group (nccl on CUDA, gloo on CPU) when world > 1."""
    env = read_dist_env()
    if device_type == "cuda":
        torch.cuda.set_device(env.local_rank % max(torch.cuda.device_count(), 1))
    if env.world_size > 1 and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
        dist.init_process_group(
            backend="nccl" if device_type == "cuda" else "gloo",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(seconds=timeout_s),
            device_id=torch.device("cuda", torch.cuda.current_device())
            if device_type == "cuda"
            else None,
        )
    return env


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
