"""Run a function on N gloo ranks in spawned processes and collect each rank's return value.

Usage: ``results = run_ranks(fn, world, *args)``, with ``fn(rank, world, *args)`` a module-level
function (it must be picklable). The process group is initialised before ``fn`` runs and torn
down after; an exception on any rank fails the call with that rank's traceback.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["free_port", "run_ranks", "torchrun_cmd"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(nproc: int) -> list[str]:
    """The start of a ``torchrun`` command line for ``nproc`` local processes on a free port
    (never the shared default 29500); append the script and its arguments."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
    ]


def _entry(rank, world, port, fn, args, out_dir, env):
    os.environ.update(env)
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
        }
    )
    torch.set_num_threads(1)
    path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        # Rendezvous through a file in this run's own folder: no port to probe and then bind
        # (another process can take a probed port in between). MASTER_* stay set for code that
        # reads the launcher's environment.
        dist.init_process_group(
            "gloo",
            init_method=f"file://{os.path.join(out_dir, 'rendezvous')}",
            rank=rank,
            world_size=world,
        )
        result = fn(rank, world, *args)
        torch.save({"ok": True, "result": result}, path)
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    # Every rank's collectives are done once all pass the barrier. Then leave without the
    # interpreter's finalisation, where gloo worker threads still holding work objects can
    # abort a process (SIGABRT, "terminate called without an active exception"). A rank of a
    # two-process trainer test died that way twice in CI-like runs, at an unknown point; the
    # failure report below now says which ranks left a result.
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn, world: int, *args, env: dict | None = None) -> list:
    """Spawn ``world`` processes running ``fn(rank, world, *args)``; return their results."""
    with tempfile.TemporaryDirectory() as out_dir:
        port = free_port()
        ctx = mp.start_processes(
            _entry,
            args=(world, port, fn, args, out_dir, env or {}),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        try:
            while not ctx.join():
                pass
        except Exception as e:
            msgs = []
            for r in range(world):
                p = os.path.join(out_dir, f"rank{r}.pt")
                if not os.path.exists(p):
                    msgs.append(f"--- rank {r}: no result (the process died inside fn)")
                    continue
                res = torch.load(p, weights_only=False)
                if not res["ok"]:
                    msgs.append(f"--- rank {r}:\n{res['error']}")
            if not msgs:
                msgs.append("every rank saved a result: the failure came after fn returned")
            raise RuntimeError(f"a rank failed ({e}):\n" + "\n".join(msgs)) from None
        return [
            torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)["result"]
            for r in range(world)
        ]
