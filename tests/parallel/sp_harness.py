"""Run a suite of SP cases in W gloo processes (one process group for all cases) and collect
per-case results. Used by the tests in this folder; the worker is ``sp_worker.py``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from tests.dist_harness import free_port

__all__ = ["run_suite", "suite_results", "check_case", "rel_err"]

_HERE = Path(__file__).resolve().parent


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest reference magnitude."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


_ROOT = _HERE.parents[1]


def run_suite(suite: str, world: int, *, timeout: float = 240.0) -> dict[str, dict]:
    """``{case: {"ok": bool, "err": float, "msg": str, "s": seconds}}`` merged over ranks
    (a case is ok only if it is ok on every rank; ``err`` is the max over ranks)."""
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(_ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    str(_HERE / "sp_worker.py"),
                    "--suite",
                    suite,
                    "--world",
                    str(world),
                    "--rank",
                    str(r),
                    "--port",
                    str(port),
                    "--out",
                    tmp,
                ],
                env=env,
                cwd=_ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            for r in range(world)
        ]
        deadline = time.monotonic() + timeout
        logs = []
        try:
            for p in procs:
                out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
                logs.append(out.decode(errors="replace"))
        except subprocess.TimeoutExpired as e:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
            msg = f"suite {suite!r} at world {world} timed out after {timeout}s"
            raise RuntimeError(msg) from e
        merged: dict[str, dict] = {}
        for r in range(world):
            path = Path(tmp) / f"rank{r}.json"
            if not path.exists():
                tail = "\n".join(log[-3000:] for log in logs)
                raise RuntimeError(
                    f"rank {r} wrote no results (suite {suite!r}, world {world}):\n{tail}"
                )
            for name, res in json.loads(path.read_text()).items():
                m = merged.setdefault(name, {"ok": True, "err": 0.0, "msg": "", "s": 0.0})
                m["ok"] &= res["ok"]
                m["err"] = max(m["err"], res.get("err", 0.0))
                m["s"] = max(m["s"], res.get("s", 0.0))
                if "data" in res and r == 0:
                    m["data"] = res["data"]
                if res.get("msg"):
                    m["msg"] += f"[rank {r}] {res['msg']}\n"
        return merged


_CACHE: dict[tuple[str, int], dict | Exception] = {}


def suite_results(suite: str, world: int, *, timeout: float = 240.0) -> dict[str, dict]:
    """:func:`run_suite`, run once per (suite, world) per test session."""
    key = (suite, world)
    if key not in _CACHE:
        try:
            _CACHE[key] = run_suite(suite, world, timeout=timeout)
        except Exception as e:  # every case of the suite reports the same failure
            _CACHE[key] = e
    res = _CACHE[key]
    if isinstance(res, Exception):
        raise res
    return res


def check_case(suite: str, world: int, case: str) -> None:
    """Assert that ``case`` passed on every rank (with its error message if not)."""
    res = suite_results(suite, world)
    if case not in res:
        raise AssertionError(f"case {case!r} did not run")
    r = res[case]
    assert r["ok"], f"{case} (world {world}): err {r['err']:.3g}\n{r['msg']}"
