"""Subprocess side of test_sm90_compile.py: record the Triton launches of the public ops under
the interpreter, then compile each recorded launch for sm_90 with the real compiler.

``python tests/ops/_sm90_compile_worker.py record OUT.json`` (needs ``TRITON_INTERPRET=1``)
runs the public ops forward and backward on small CPU inputs (bf16 and fp32, production
head sizes) and writes every distinct launch: the kernel (module and name), its signature as
Triton's CUDA launcher would specialise it (``*bf16``, ``i32`` ..., with the divisibility-by-16
attributes), its constexprs and its launch options (``num_warps``, ``num_stages``).

``python tests/ops/_sm90_compile_worker.py compile IN.json OUT.json`` (without
``TRITON_INTERPRET``) compiles each of them with ``triton.compile`` for
``GPUTarget("cuda", 90, 128)`` in a process pool, and writes per launch either the error or
the registers, spills and shared memory of the cubin.

The two steps run in separate processes because ``TRITON_INTERPRET`` is read when a kernel is
decorated: under the interpreter the kernels are ``InterpretedFunction`` objects that cannot be
compiled, without it they cannot run on the CPU.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ARCH = 90
WARP_SIZE = 32
H100_SMS = 132
# cudaDevAttrMaxSharedMemoryPerBlockOptin of the H100 (227 KiB): what Triton compares
# ``metadata.shared`` against before a launch (OutOfResources above it).
SM90_MAX_SHARED = 232448
PACKAGE = "models.ops.triton_ops"


def _target():
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", ARCH, WARP_SIZE)


# --------------------------------------------------------------------------------------------
# record (TRITON_INTERPRET=1)
# --------------------------------------------------------------------------------------------


class Recorder:
    """Wraps ``InterpretedFunction.run`` (what ``kernel[grid](...)`` calls under the
    interpreter) and specialises each launch the way ``JITFunction.run`` would for a CUDA
    target, with Triton's own binder (``create_function_from_signature``) and ``_pack_args``."""

    def __init__(self):
        from triton.compiler import make_backend

        self.backend = make_backend(_target())
        self.launches: dict[str, dict] = {}
        self.case = ""
        self.fallback_stage1 = False
        self._binders: dict = {}

    def _binder(self, fn):
        if fn not in self._binders:
            from triton.runtime.jit import JITFunction, create_function_from_signature

            jf = JITFunction(fn)
            binder = create_function_from_signature(jf.signature, jf.params, self.backend)
            self._binders[fn] = (jf, binder)
        return self._binders[fn]

    def record(self, fn, args, kwargs):
        from triton.backends.nvidia.compiler import CUDAOptions

        jf, binder = self._binder(fn)
        bound_args, specialization, options = binder(*args, **kwargs)
        opts, signature, constexprs, attrs = jf._pack_args(
            self.backend, dict(kwargs), bound_args, specialization, options
        )
        launch_opts = {k: v for k, v in kwargs.items() if k in CUDAOptions.__dataclass_fields__}
        launch_opts.update(num_warps=opts.num_warps, num_stages=opts.num_stages)
        entry = {
            "module": fn.__module__,
            "name": fn.__qualname__,
            "signature": signature,
            "constexprs": [[list(p), _jsonable(v)] for p, v in sorted(constexprs.items())],
            "attrs": [[list(p), v] for p, v in sorted(attrs.items())],
            "options": dict(sorted(launch_opts.items())),
            "stage1_fallback": self.fallback_stage1,
        }
        key = json.dumps(entry, sort_keys=True)
        seen = self.launches.setdefault(key, dict(entry, cases=[]))
        if self.case not in seen["cases"]:
            seen["cases"].append(self.case)


def _jsonable(v):
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    raise TypeError(f"constexpr value {v!r} ({type(v).__name__}) cannot be recorded")


def _install(rec: Recorder) -> None:
    """Hook the interpreter's launcher, and make the host code choose what it would on an
    H100 (precisions of the delta WY kernel, SM count) although the tensors are on the CPU."""
    import torch
    from triton.runtime.interpreter import InterpretedFunction

    import models.ops.triton_ops.common as common
    import models.ops.triton_ops.delta as delta

    orig_run = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        rec.record(self.fn, args, kwargs)
        return orig_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run

    orig_prec = delta._prec

    class _OnCuda:  # what _prec looks at: the device type and the dtype
        def __init__(self, x):
            self.device, self.dtype = torch.device("cuda"), x.dtype

    delta._prec = lambda x: orig_prec(_OnCuda(x))
    common.num_sms = delta.num_sms = lambda device: H100_SMS

    orig_scan = delta._launch_scan

    def launch_scan(*args, **kwargs):
        # The scans retry with num_stages=1 when the pipelined tiles exceed shared memory.
        rec.fallback_stage1 = True
        try:
            return orig_scan(*args, **kwargs)
        finally:
            rec.fallback_stage1 = False

    delta._launch_scan = launch_scan


def _inputs(kind, B, T, H, K, V, dtype, *, cu=None, state=False, seed=0):
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)

    def rn(*s):
        return torch.randn(*s, generator=gen)

    x = {"q": rn(B, T, H, K), "k": rn(B, T, H, K) * K**-0.5, "v": rn(B, T, H, V)}
    if kind == "gated_delta":
        x["k"] = F.normalize(x["k"], dim=-1)
    x = {n: t.to(dtype).requires_grad_() for n, t in x.items()}
    # Gates and beta stay fp32, as the layers pass them (models/layers/linear_attention.py).
    if kind in ("scalar", "gated_delta"):
        x["g"] = F.logsigmoid(rn(B, T, H) + 2).requires_grad_()
    if kind == "gla":
        x["gk"] = F.logsigmoid(rn(B, T, H, K) + 2).requires_grad_()
    if kind in ("delta", "gated_delta"):
        x["beta"] = torch.rand(B, T, H, generator=gen).requires_grad_()
    if kind == "delta":
        x["g"] = None
    n = B if cu is None else len(cu) - 1
    kw = {}
    if cu is not None:
        kw["cu_seqlens"] = torch.tensor(cu, dtype=torch.long)
    if state:
        kw["initial_state"] = rn(n, H, K, V).requires_grad_()
        kw["output_final_state"] = True
    return x, kw


def _run_op(kind, x, kw):
    import models.ops as ops

    if kind in ("linear", "scalar"):
        g = x.get("g")
        o, ht = ops.chunk_linear_attn(x["q"], x["k"], x["v"], g, backend="triton", **kw)
    elif kind == "gla":
        o, ht = ops.chunk_gla(x["q"], x["k"], x["v"], x["gk"], backend="triton", **kw)
    else:
        o, ht = ops.chunk_gated_delta_rule(
            x["q"], x["k"], x["v"], x["g"], x["beta"], backend="triton", **kw
        )
    loss = o.float().square().sum()
    if ht is not None:  # gives the backward a final-state gradient (HAS_DHT / HAS_H0 paths)
        loss = loss + ht.square().sum()
    loss.backward()


# (kind, dtype, K, V, varlen, state, env): the shapes of the production configurations (head
# sizes 128, 256, and 64 / 192, the last two being what LASP-2's gated delta rule passes with
# its [v | 0] trick), T = 300 (several chunks of 64 and, with cu_seqlens, several documents).
_SHAPES = ((128, 128), (256, 256), (64, 192))


def cases() -> list[tuple]:
    out = []
    for kind in ("linear", "scalar", "gla", "gated_delta"):
        for K, V in _SHAPES:
            out.append((kind, "bf16", K, V, False, False, {}))
        # LASP-2: an initial state, the final state and its gradient.
        out.append((kind, "bf16", 128, 128, False, True, {}))
        # packed documents
        out.append((kind, "bf16", 128, 128, True, False, {}))
        # fp32 inputs (fewer pipeline stages, 3xTF32 in the delta rule)
        out.append((kind, "fp32", 128, 128, False, False, {}))
    out += [
        ("gated_delta", "bf16", 128, 256, False, True, {}),  # LASP-2 gated delta, K = V = 128
        ("gated_delta", "bf16", 64, 192, False, True, {}),  # LASP-2 gated delta, K = V = 64
        ("delta", "bf16", 128, 128, False, False, {}),  # chunk_gated_delta_rule with g=None
        # the scans' V tile at many sequences x heads (auto picks 32 there, 16 at this size)
        ("gated_delta", "bf16", 128, 128, False, False, {"LINSCALE_DELTA_SCAN_BV": "32"}),
        # the older GLA intra-chunk kernels, still selectable
        ("gla", "bf16", 128, 128, False, False, {"LINSCALE_GLA_INTRA": "v1"}),
    ]
    return out


def _xent(rec: Recorder) -> None:
    import torch

    from models.loss import chunked_cross_entropy

    os.environ["LINSCALE_CE_BACKEND"] = "triton"
    gen = torch.Generator().manual_seed(0)
    # V over one 4096-wide block and under it; bf16 (autocast) and fp32 logits.
    for V, dtype in ((4112, torch.bfloat16), (300, torch.bfloat16), (4112, torch.float32)):
        rec.case = f"xent V={V} {str(dtype)[6:]}"
        h = torch.randn(12, 64, generator=gen).to(dtype).requires_grad_()
        w = torch.randn(V, 64, generator=gen).to(dtype).requires_grad_()
        y = torch.randint(0, V, (12,), generator=gen)
        y[3] = -100
        chunked_cross_entropy(h, w, y, chunk_tokens=8).backward()


def record(out_path: str) -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("record needs TRITON_INTERPRET=1")
    import torch

    torch.set_num_threads(1)
    rec = Recorder()
    _install(rec)
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    H, T = 2, 320
    base_env = dict(os.environ)
    for i, (kind, dt, K, V, varlen, state, env) in enumerate(cases()):
        os.environ.clear()
        os.environ.update(base_env, **env)
        cu = [0, 100, 164, 300] if varlen else None
        rec.case = f"{kind} {dt} K={K} V={V}" + " varlen" * varlen + " state" * state
        rec.case += "".join(f" {k}={v}" for k, v in env.items())
        tt = 300 if varlen else T  # varlen: a token count that is not a multiple of 16
        x, kw = _inputs(kind, 1, tt, H, K, V, dtypes[dt], cu=cu, state=state, seed=i)
        _run_op(kind, x, kw)
    os.environ.clear()
    os.environ.update(base_env)
    _xent(rec)
    Path(out_path).write_text(json.dumps(list(rec.launches.values()), indent=1))


# --------------------------------------------------------------------------------------------
# compile (real compiler, no GPU)
# --------------------------------------------------------------------------------------------


def _cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def _resources(cubin: bytes) -> dict:
    """Registers and local memory of the cubin, as ``cuobjdump --dump-resource-usage`` reports
    them (Triton's ``n_spills`` is the local memory size in 4-byte words)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True
        ).stdout
    m = re.search(r"REG:(\d+).*?LOCAL:(\d+)", out)
    if not m:
        return {"n_regs": None, "n_spills": None}
    return {"n_regs": int(m.group(1)), "n_spills": int(m.group(2)) // 4}


def jit_function(module: str, name: str):
    return getattr(importlib.import_module(module), name)


def compile_one(launch: dict) -> dict:
    """Compile one recorded launch for sm_90; returns its metadata or the compiler's error."""
    import triton
    from triton.compiler import ASTSource

    out = {k: launch[k] for k in ("module", "name", "signature", "constexprs", "options")}
    try:
        fn = jit_function(launch["module"], launch["name"])
        src = ASTSource(
            fn=fn,
            signature=launch["signature"],
            constexprs={tuple(p): v for p, v in launch["constexprs"]},
            attrs={tuple(p): v for p, v in launch["attrs"]},
        )
        with contextlib.redirect_stdout(io.StringIO()):
            ck = triton.compile(src, target=_target(), options=dict(launch["options"]))
        out.update(_resources(ck.asm["cubin"]), shared=ck.metadata.shared, error=None)
        if out["shared"] > SM90_MAX_SHARED:
            msg = f"needs {out['shared']} B of shared memory, the H100 has {SM90_MAX_SHARED}"
            if launch["stage1_fallback"] and launch["options"].get("num_stages", 3) > 1:
                # the launcher retries this one with num_stages=1: that one has to fit
                retry = dict(launch, options=dict(launch["options"], num_stages=1))
                retry["stage1_fallback"] = False
                r = compile_one(retry)
                out["fallback"] = r
                if r["error"] is not None:
                    out["error"] = f"{msg}; num_stages=1 fallback: {r['error']}"
            else:
                out["error"] = f"OutOfResources: {msg}"
    except Exception as exc:  # noqa: BLE001 - every failure is reported to the test
        lines = traceback.format_exception_only(type(exc), exc)
        out["error"] = "".join(lines).strip()[-4000:]
    return out


def compile_all(in_path: str, out_path: str) -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("compile must run without TRITON_INTERPRET")
    launches = json.loads(Path(in_path).read_text())
    jobs = int(os.environ.get("SM90_COMPILE_JOBS", "0")) or os.cpu_count() or 1
    # the biggest kernels first, so that the pool does not wait on one at the end
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(compile_one, launches))
    for launch, r in zip(launches, results):
        r["cases"] = launch["cases"]
    Path(out_path).write_text(json.dumps({"results": results, "kernels": _all_kernels()}))


def _all_kernels() -> list[str]:
    """``module:name`` of every ``@triton.jit`` function named ``*_kernel`` in the package (the
    launched ones; helpers have other names), so the test can check that each was recorded."""
    import pkgutil

    from triton.runtime.jit import JITFunction

    pkg = importlib.import_module(PACKAGE)
    names = []
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{PACKAGE}.{info.name}")
        for attr, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and attr.endswith("_kernel"):
                names.append(f"{obj.fn.__module__}:{obj.fn.__qualname__}")
    return sorted(set(names))


if __name__ == "__main__":
    if sys.argv[1] == "record":
        record(sys.argv[2])
    elif sys.argv[1] == "compile":
        compile_all(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")
