"""Every Triton launch of the public ops, compiled for the H100 (sm_90) without a GPU.

CI has no GPU, so the kernel tests run in the Triton interpreter (``TRITON_INTERPRET=1``),
which executes the kernels as Python and accepts code the GPU compiler refuses: a kernel that
read a plain Python float global inside ``@triton.jit`` (it must be a ``tl.constexpr``) passed
every CPU test and failed on the H100 with "Cannot access global variable ... from within
@jit'ed function". The interpreter also ignores the launch settings (``num_warps``,
``num_stages``) and does not lower the tile constexprs to registers and shared memory, so a
setting that does not compile or does not fit only shows on the GPU.

This test closes that gap with the compiler and ``ptxas`` that ship with the triton wheel:

1. record: in subprocesses with ``TRITON_INTERPRET=1``, run ``chunk_linear_attn`` (g None and
   scalar g), ``chunk_gla``, ``chunk_gated_delta_rule`` forward and backward and the fused
   cross-entropy of ``chunked_cross_entropy`` on small CPU inputs (bf16 and fp32, head sizes
   128, 256 and 64 / 192, states, cu_seqlens), and record each ``kernel[grid](...)`` launch
   with the signature, divisibility attributes, constexprs and options that ``JITFunction.run``
   would pass to the compiler on a GPU (see ``_sm90_compile_worker.py``);
2. compile: in a subprocess without the interpreter, ``triton.compile`` each distinct launch for
   ``GPUTarget("cuda", 90, 128)``. Any compiler error fails the test, with the kernel, its
   signature, constexprs and the compiler's message; so does a kernel that needs more shared
   memory than an H100 block may have (unless its launcher retries it with one pipeline stage
   and that fits). Registers and spills are printed, not asserted.

The host code makes its CUDA choices while recording (the delta rule's TF32 precisions, the
H100's SM count), the ``LINSCALE_*`` launch knobs stay at their defaults, and each launch
configuration is interpreted once (repeats are only recorded). Every ``*_kernel`` of
``models.ops.triton_ops`` must be launched by some recorded case: a new kernel or launch path
needs a case in ``_sm90_compile_worker.CASES``.

``test_compile_path_rejects_a_plain_global`` checks that this compile path does fail on the
bug class above (and that the interpreter does not), so the harness cannot pass vacuously.
Both skip only when triton or its ``ptxas`` is missing.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
WORKER = HERE / "_sm90_compile_worker.py"


def _require_ptxas() -> str:
    """Path of the ptxas Triton would use for sm_90; skip when there is none."""
    try:
        from triton.backends.nvidia import compiler as nv
    except Exception as exc:  # noqa: BLE001 - a triton without the NVIDIA backend
        pytest.skip(f"triton has no NVIDIA backend ({type(exc).__name__}: {exc})")
    get = getattr(nv, "get_ptxas", None)
    try:
        if get is not None:
            tool = get(90) if inspect.signature(get).parameters else get()
            return tool.path
    except RuntimeError as exc:  # knobs raise "Cannot find ptxas"
        pytest.skip(f"no ptxas for sm_90: {exc}")
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not path.exists():
        pytest.skip(f"no ptxas at {path}")
    return str(path)


def _env(*, interpret: bool, **extra: str) -> dict:
    """Subprocess environment: the ops' launch knobs at their defaults (no LINSCALE_*), the
    interpreter on or off, never the non-constexpr-globals escape hatch."""
    drop = ("TRITON_INTERPRET", "TRITON_ALLOW_NON_CONSTEXPR_GLOBALS")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("LINSCALE_")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **extra)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return env


def _run(args: list, env: dict, timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(WORKER), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        msg = f"{args[0]} worker failed (rc {proc.returncode}):\n"
        pytest.fail(msg + f"{proc.stdout[-5000:]}\n{proc.stderr[-10000:]}")
    return proc


def _record(tmp: Path) -> list[dict]:
    """Launches of all cases, recorded by parallel interpreter shards and de-duplicated."""
    n = max(1, min(os.cpu_count() or 1, 4))
    env = _env(interpret=True)
    procs = []
    for i in range(n):
        out = tmp / f"record{i}.json"
        cmd = [sys.executable, str(WORKER), "record", str(out), str(i), str(n)]
        pipe = subprocess.PIPE
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=pipe, stderr=pipe, text=True)
        procs.append((out, proc))
    merged: dict[str, dict] = {}
    errors = []
    for out, proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            errors.append(f"rc {proc.returncode}:\n{stdout[-3000:]}\n{stderr[-8000:]}")
            continue
        for launch in json.loads(out.read_text()):
            key = json.dumps({k: v for k, v in launch.items() if k != "cases"}, sort_keys=True)
            seen = merged.setdefault(key, dict(launch, cases=[]))
            seen["cases"] += [c for c in launch["cases"] if c not in seen["cases"]]
    if errors:
        pytest.fail("recording the launches under the interpreter failed:\n" + "\n".join(errors))
    return list(merged.values())


def _named(r: dict, items) -> dict:
    """Recorded ``[[path], value]`` pairs keyed by parameter name."""
    names = list(r["signature"])
    return {names[p[0]]: v for p, v in items}


def _describe(r: dict) -> str:
    return (
        f"{r['module']}:{r['name']}\n  signature {r['signature']}\n"
        f"  constexprs {_named(r, r['constexprs'])}\n  options {r['options']}\n"
        f"  launched by {r['cases'][:4]}{' ...' if len(r['cases']) > 4 else ''}\n"
        f"  error: {r['error']}"
    )


def _table(results: list[dict]) -> str:
    """One row per compiled configuration: launch options, registers, spills, shared memory,
    the first case that launched it and the constexprs that vary between the configurations
    of that kernel."""
    by_kernel = defaultdict(list)
    for r in results:
        by_kernel[r["name"]].append(r)
    rows = [f"{'kernel':26} w/s     regs spill st/ld B  smem  first case | varying constexprs"]
    for name in sorted(by_kernel):
        rs = by_kernel[name]
        consts = {id(r): _named(r, r["constexprs"]) for r in rs}
        first = consts[id(rs[0])]
        varying = [k for k in first if len({str(consts[id(r)].get(k)) for r in rs}) > 1]
        for r in sorted(rs, key=lambda r: (r["cases"][0], str(consts[id(r)]))):
            spill = (
                "-" if r.get("spill_stores") is None else f"{r['spill_stores']}/{r['spill_loads']}"
            )
            smem = "-" if r.get("shared") is None else f"{r['shared'] // 1024}K"
            if r.get("fallback"):
                fb = r["fallback"]
                smem += f" (num_stages=1: {fb.get('shared', 0) // 1024}K, {fb.get('n_regs')} regs)"
            rows.append(
                f"{name:26} {r['options'].get('num_warps')}/{r['options'].get('num_stages')}"
                f" {str(r.get('n_regs')):>6} {spill:>11} {smem:>5}"
                f"{'  FAILED' if r['error'] else ''}  {r['cases'][0]} | "
                + " ".join(f"{k}={consts[id(r)].get(k)}" for k in varying)
            )
    return "\n".join(rows)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_public_launch_compiles_for_sm90(tmp_path, capsys):
    _require_ptxas()
    t0 = time.perf_counter()
    launches = _record(tmp_path)
    t1 = time.perf_counter()
    (tmp_path / "launches.json").write_text(json.dumps(launches))
    _run(
        ["compile", tmp_path / "launches.json", tmp_path / "compiled.json"],
        _env(interpret=False, TRITON_CACHE_DIR=str(tmp_path / "triton-cache")),
        timeout=540,
    )
    t2 = time.perf_counter()
    out = json.loads((tmp_path / "compiled.json").read_text())
    results = out["results"]
    failed = [r for r in results if r["error"]]
    spilling = [r for r in results if r.get("spill_stores")]
    with capsys.disabled():
        print(f"\n{_table(results)}")
        print(
            f"sm_90: {len(results)} distinct launch configurations of "
            f"{len({r['name'] for r in results})} kernels; {len(failed)} failed, "
            f"{len(spilling)} spill; record {t1 - t0:.0f} s, compile {t2 - t1:.0f} s"
        )
    assert not failed, f"{len(failed)} launch(es) do not compile for sm_90:\n" + "\n".join(
        _describe(r) for r in failed
    )
    recorded = {f"{r['module']}:{r['name']}" for r in results}
    missing = sorted(set(out["kernels"]) - recorded)
    assert not missing, f"kernels no recorded case launches (add a case to CASES): {missing}"


@pytest.mark.timeout(300)
def test_compile_path_rejects_a_plain_global(tmp_path):
    """The bug that reached the H100: a plain Python float global read in a kernel. The
    compile path above must reject it (and compile the ``tl.constexpr`` version), while the
    interpreter runs it."""
    _require_ptxas()
    _run(
        ["selfcheck", tmp_path / "selfcheck.json"],
        _env(interpret=False, TRITON_CACHE_DIR=str(tmp_path / "triton-cache")),
        timeout=280,
    )
    res = json.loads((tmp_path / "selfcheck.json").read_text())
    good, bad = res["selfcheck_constexpr_global_kernel"], res["selfcheck_plain_global_kernel"]
    assert good["error"] is None, f"the constexpr-global kernel must compile: {good['error']}"
    assert good["n_regs"], good
    assert bad["error"] and "Cannot access global variable SELFCHECK_PLAIN" in bad["error"], bad
    proc = _run(["interpret-selfcheck"], _env(interpret=True), timeout=280)
    assert "INTERPRETED" in proc.stdout
