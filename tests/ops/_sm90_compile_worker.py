"""Subprocess side of test_sm90_compile.py: record the Triton launches of the public ops under
the interpreter, then compile each recorded launch for sm_90 with the real compiler.

Modes (``python tests/ops/_sm90_compile_worker.py MODE ...``):

``record OUT.json [SHARD NSHARDS]`` (needs ``TRITON_INTERPRET=1``)
    Runs the public ops forward and backward (:data:`CASES`, every NSHARDS-th one from SHARD)
    and the fused cross-entropy on small CPU inputs, and writes every distinct launch: the
    kernel (module and name), its signature as Triton's CUDA launcher would specialise it
    (``*bf16``, ``i32``, ... and the divisible-by-16 attributes), its constexprs and its launch
    options (``num_warps``, ``num_stages``).
``compile IN.json OUT.json`` (without ``TRITON_INTERPRET``)
    Compiles each launch with ``triton.compile`` for ``GPUTarget("cuda", 90, 128)`` in a
    process pool; writes per launch the compiler's error, or the registers, spills and shared
    memory of the cubin, and the names of all kernels of the package.
``selfcheck OUT.json`` (without ``TRITON_INTERPRET``)
    Compiles the two synthetic kernels below through the same path: one reads a plain Python
    global (must fail), the other a ``tl.constexpr`` global (must compile).
``interpret-selfcheck`` (with ``TRITON_INTERPRET=1``)
    Runs the plain-global kernel in the interpreter, which accepts it (the gap this guards).

Recording and compiling are separate processes because ``TRITON_INTERPRET`` is read when a
kernel is decorated: interpreted kernels cannot be compiled, compiled ones cannot run on a CPU.
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

import triton
import triton.language as tl

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ARCH = 90
WARP_SIZE = 32
H100_SMS = 132
# cudaDevAttrMaxSharedMemoryPerBlockOptin of the H100 (227 KiB), what Triton compares
# ``metadata.shared`` with before a launch (OutOfResources above it).
SM90_MAX_SHARED = 232448
PACKAGE = "models.ops.triton_ops"
# Each launch configuration is interpreted the first time it is seen and only recorded after
# that (nothing here checks values); SM90_RECORD_EXECUTE_ALL=1 interprets every launch.
EXECUTE_ALL = os.environ.get("SM90_RECORD_EXECUTE_ALL") == "1"


def _target():
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", ARCH, WARP_SIZE)


# --------------------------------------------------------------------------------------------
# synthetic kernels of the self-check: the bug that reached the H100 (softmax_xent's _NEG)
# --------------------------------------------------------------------------------------------

SELFCHECK_PLAIN = -1.0e30  # a plain Python float: "Cannot access global variable" on the GPU
SELFCHECK_CONST = tl.constexpr(-1.0e30)


@triton.jit
def selfcheck_plain_global_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=SELFCHECK_PLAIN)
    tl.store(x_ptr + offs, tl.maximum(x, SELFCHECK_PLAIN), mask=offs < n)


@triton.jit
def selfcheck_constexpr_global_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=SELFCHECK_CONST)
    tl.store(x_ptr + offs, tl.maximum(x, SELFCHECK_CONST), mask=offs < n)


def selfcheck_launch(name: str) -> dict:
    """A launch record of a synthetic kernel, as :class:`Recorder` would write it."""
    return {
        "module": "_sm90_compile_worker",
        "name": name,
        "signature": {"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"},
        "constexprs": [[[2], 128]],
        "attrs": [[[0], [["tt.divisibility", 16]]]],
        "options": {"num_warps": 4, "num_stages": 3},
        "stage1_fallback": False,
        "cases": ["selfcheck"],
    }


# --------------------------------------------------------------------------------------------
# record (TRITON_INTERPRET=1)
# --------------------------------------------------------------------------------------------


class Recorder:
    """Wraps ``InterpretedFunction.run`` (what ``kernel[grid](...)`` calls under the
    interpreter) and specialises each launch as ``JITFunction.run`` would for a CUDA target,
    with Triton's own binder (``create_function_from_signature``) and argument packing."""

    def __init__(self):
        from triton.compiler import make_backend

        self.backend = make_backend(_target())
        self.launches: dict[str, dict] = {}
        self.case = ""
        self.stage1_fallback = False
        self._binders: dict = {}

    def _binder(self, fn):
        if fn not in self._binders:
            from triton.runtime.jit import JITFunction, create_function_from_signature

            jf = JITFunction(fn)
            binder = create_function_from_signature(jf.signature, jf.params, self.backend)
            self._binders[fn] = (jf, binder)
        return self._binders[fn]

    def _pack(self, jf, kwargs, bound_args, specialization, options):
        """(signature, constexprs, attrs) exactly as JITFunction.run passes them to compile."""
        if hasattr(jf, "_pack_args"):
            _, sig, consts, attrs = jf._pack_args(
                self.backend, dict(kwargs), bound_args, specialization, options
            )
            return sig, consts, attrs
        from triton._utils import find_paths_if, get_iterable_path

        sigvals = [x[0] for x in specialization]
        sig = {p.name: v for p, v in zip(jf.params, sigvals)}
        paths = find_paths_if(sigvals, lambda _, v: v == "constexpr")
        consts = {p: get_iterable_path(list(bound_args.values()), p) for p in paths}
        attrvals = ["" if x[0] == "constexpr" else x[1] for x in specialization]
        paths = find_paths_if(attrvals, lambda _, x: isinstance(x, str))
        attrs = {p: self.backend.parse_attr(get_iterable_path(attrvals, p)) for p in paths}
        return sig, consts, attrs

    def record(self, fn, args, kwargs) -> bool:
        """Record one launch; True the first time its configuration is seen."""
        jf, binder = self._binder(fn)
        bound_args, specialization, options = binder(*args, **kwargs)
        sig, consts, attrs = self._pack(jf, kwargs, bound_args, specialization, options)
        parsed = self.backend.parse_options(dict(kwargs))
        launch_opts = {k: v for k, v in kwargs.items() if k in parsed.__dict__}
        launch_opts.update(num_warps=parsed.num_warps, num_stages=parsed.num_stages)
        entry = {
            "module": fn.__module__,
            "name": fn.__qualname__,
            "signature": sig,
            "constexprs": [[list(p), _jsonable(v)] for p, v in sorted(consts.items())],
            "attrs": [[list(p), v] for p, v in sorted(attrs.items())],
            "options": dict(sorted(launch_opts.items())),
            "stage1_fallback": self.stage1_fallback,
        }
        key = json.dumps(entry, sort_keys=True)
        new = key not in self.launches
        seen = self.launches.setdefault(key, dict(entry, cases=[]))
        if self.case not in seen["cases"]:
            seen["cases"].append(self.case)
        return new


def _jsonable(v):
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    raise TypeError(f"constexpr value {v!r} ({type(v).__name__}) cannot be recorded")


def _install(rec: Recorder) -> None:
    """Hook the interpreter's launcher, and let the host code choose what it would on an H100
    (precisions of the delta rule's WY products, SM count) although the tensors are on the CPU.
    """
    import torch
    from triton.runtime.interpreter import InterpretedFunction

    import models.ops.triton_ops.common as common
    import models.ops.triton_ops.delta as delta
    import models.ops.triton_ops.delta_scan as delta_scan

    orig_run = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        if rec.record(self.fn, args, kwargs) or EXECUTE_ALL:
            return orig_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        return None

    InterpretedFunction.run = run

    orig_prec = delta._prec

    class _OnCuda:  # all that _prec reads of its tensor
        def __init__(self, x):
            self.device, self.dtype = torch.device("cuda"), x.dtype

    delta._prec = lambda x: orig_prec(_OnCuda(x))
    delta_scan._prec = lambda device: "tf32x3"
    common.num_sms = delta_scan.num_sms = lambda device: H100_SMS

    orig_scan = delta_scan.launch_scan

    def launch_scan(*args, **kwargs):
        # launch_scan retries with num_stages=1 when the pipelined tiles exceed shared memory
        rec.stage1_fallback = True
        try:
            return orig_scan(*args, **kwargs)
        finally:
            rec.stage1_fallback = False

    delta_scan.launch_scan = launch_scan


# (kind, dtype, K, V, varlen, state, env); kind "scalar_fixed" is scalar decay with a gate that
# takes no gradient, "scalar_head" one log decay per head expanded over T (the per-head kernels,
# HEAD_G). Head sizes 128, 256 and 64 / 192; 128 / 256 and
# 64 / 192 with states are what LASP-2's gated delta rule passes (values [v | 0], K + V wide).
# T = 320: five chunks of 64 in two groups; varlen: three documents in 300 tokens (a count
# that is not a multiple of 16, which changes the integer specialisations).
_SHAPES = ((128, 128), (256, 256), (64, 192))
CASES: list[tuple] = []
for _kind in ("linear", "scalar", "gla", "gated_delta"):
    CASES += [(_kind, "bf16", K, V, False, False, {}) for K, V in _SHAPES]
    CASES += [
        (_kind, "bf16", 128, 128, False, True, {}),  # initial state, final state and its grad
        (_kind, "bf16", 128, 128, True, False, {}),  # packed documents (cu_seqlens)
        (_kind, "fp32", 128, 128, False, False, {}),  # fp32 inputs: other stages / precisions
    ]
CASES += [
    ("gated_delta", "bf16", 128, 256, False, True, {}),
    ("gated_delta", "bf16", 64, 192, False, True, {}),
    ("delta", "bf16", 128, 128, False, False, {}),  # chunk_gated_delta_rule with g=None
    # the scans' V tile with many sequences x heads (auto picks 32 there, 16 at this size)
    ("gated_delta", "bf16", 128, 128, False, False, {"LINSCALE_DELTA_SCAN_BV": "32"}),
    # 16-bit inputs with the intermediates kept in fp32 (the pre-bf16-storage kernels)
    ("gated_delta", "bf16", 128, 128, False, False, {"LINSCALE_DELTA_STORE": "fp32"}),
    # the WY backward with tf32 products for 16-bit inputs; the dq/dk/w kernel with K whole
    ("gated_delta", "bf16", 128, 128, False, False, {"LINSCALE_DELTA_WYBWD_LOWP": "off"}),
    ("gated_delta", "bf16", 128, 128, False, False, {"LINSCALE_DELTA_DQKW_BK": "128"}),
    # the scans cut into segments (transition products, the pass across segments, replay)
    ("gated_delta", "bf16", 128, 128, False, True, {"LINSCALE_DELTA_SCAN_SEGMENT": "2"}),
    ("gated_delta", "fp32", 128, 128, False, True, {"LINSCALE_DELTA_SCAN_SEGMENT": "2"}),
    ("gated_delta", "bf16", 64, 192, True, False, {"LINSCALE_DELTA_SCAN_SEGMENT": "2"}),
    # the chunk-local dd from its own pass (with w kept, and with w recomputed)
    ("gated_delta", "bf16", 128, 128, False, False, {"LINSCALE_DELTA_LOCAL_DD": "off"}),
    (
        "gated_delta",
        "bf16",
        128,
        128,
        False,
        False,
        {"LINSCALE_DELTA_LOCAL_DD": "off", "LINSCALE_DELTA_KEEP_W": "off"},
    ),
    # w recomputed in the backward instead of kept from the forward
    ("gated_delta", "bf16", 128, 128, False, True, {"LINSCALE_DELTA_KEEP_W": "off"}),
    ("gated_delta", "bf16", 128, 128, False, False, {"LINSCALE_DELTA_UW_PREC": "tf32"}),
    ("gated_delta", "bf16", 128, 128, False, False, {"LINSCALE_DELTA_OUT_BV": "128"}),
    # scalar decay's in-chunk gate-gradient pairs from one fp32 tile with 16-bit inputs
    ("scalar", "bf16", 128, 128, True, True, {"LINSCALE_KERNEL_SCALAR_PAIRS": "exact"}),
    ("gated_delta", "bf16", 128, 128, False, False, {"LINSCALE_DELTA_SCAN_FWD_BV": "64"}),
    # the 16-row-block GLA intra-chunk kernels, still selectable
    ("gla", "bf16", 128, 128, False, False, {"LINSCALE_GLA_INTRA": "v2"}),
    ("gla", "bf16", 256, 256, False, False, {"LINSCALE_GLA_INTRA": "v2"}),
    ("gla", "bf16", 128, 128, False, False, {"LINSCALE_KERNEL_GLA_STATE_BV": "64"}),
    # scalar decay whose gate takes no gradient (the dq / dk kernels without the gate gradient)
    ("scalar_fixed", "bf16", 128, 128, False, False, {}),
    ("scalar_fixed", "fp32", 128, 128, True, True, {}),
    ("scalar_head", "bf16", 128, 128, False, False, {}),
    ("scalar_head", "fp32", 128, 128, True, True, {}),
]


def _inputs(kind, T, H, K, V, dtype, *, cu=None, state=False, seed=0):
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)

    def rn(*s):
        return torch.randn(*s, generator=gen)

    x = {"q": rn(1, T, H, K), "k": F.normalize(rn(1, T, H, K), dim=-1), "v": rn(1, T, H, V)}
    x = {n: t.to(dtype).requires_grad_() for n, t in x.items()}
    # Gates and beta stay fp32, as the layers pass them (models/layers/linear_attention.py).
    if kind in ("scalar", "scalar_fixed", "gated_delta"):
        x["g"] = F.logsigmoid(rn(1, T, H) + 2).requires_grad_(kind != "scalar_fixed")
    if kind == "scalar_head":
        x["g"] = F.logsigmoid(rn(H) + 2).view(1, 1, H).expand(1, T, H)
    if kind == "gla":
        x["gk"] = F.logsigmoid(rn(1, T, H, K) + 2).requires_grad_()
    if kind in ("delta", "gated_delta"):
        x["beta"] = torch.rand(1, T, H, generator=gen).requires_grad_()
    if kind == "delta":
        x["g"] = None
    kw = {}
    if cu is not None:
        kw["cu_seqlens"] = torch.tensor(cu, dtype=torch.long)
    if state:
        n = 1 if cu is None else len(cu) - 1
        kw["initial_state"] = rn(n, H, K, V).requires_grad_()
        kw["output_final_state"] = True
    return x, kw


def _run_op(kind, x, kw) -> None:
    import models.ops as ops

    if kind in ("linear", "scalar", "scalar_fixed", "scalar_head"):
        o, ht = ops.chunk_linear_attn(x["q"], x["k"], x["v"], x.get("g"), backend="triton", **kw)
    elif kind == "gla":
        o, ht = ops.chunk_gla(x["q"], x["k"], x["v"], x["gk"], backend="triton", **kw)
    else:
        o, ht = ops.chunk_gated_delta_rule(
            x["q"], x["k"], x["v"], x["g"], x["beta"], backend="triton", **kw
        )
    loss = o.float().square().sum()
    if ht is not None:  # a final-state gradient too (the HAS_DHT / HAS_H0 paths)
        loss = loss + ht.square().sum()
    loss.backward()


def _xent(rec: Recorder) -> None:
    import torch

    from models.loss import chunked_cross_entropy

    gen = torch.Generator().manual_seed(0)
    # Vocabularies over one 4096-wide block and a multiple of 16 (like 128256), and under one
    # block and not a multiple of 16; bf16 (autocast) and fp32 logits.
    for V, dtype in ((4112, torch.bfloat16), (300, torch.bfloat16), (4112, torch.float32)):
        rec.case = f"xent V={V} {str(dtype).removeprefix('torch.')}"
        h = torch.randn(12, 64, generator=gen).to(dtype).requires_grad_()
        w = torch.randn(V, 64, generator=gen).to(dtype).requires_grad_()
        y = torch.randint(0, V, (12,), generator=gen)
        y[3] = -100
        chunked_cross_entropy(h, w, y, chunk_tokens=8).backward()


def record(out_path: str, shard: int = 0, n_shards: int = 1) -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("record needs TRITON_INTERPRET=1")
    import torch

    torch.set_num_threads(1)
    rec = Recorder()
    _install(rec)
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    base_env = dict(os.environ)
    for i, (kind, dt, K, V, varlen, state, env) in enumerate(CASES):
        if i % n_shards != shard:
            continue
        os.environ.clear()
        os.environ.update(base_env, **env)
        rec.case = f"{kind} {dt} K={K} V={V}" + " varlen" * varlen + " state" * state
        rec.case += "".join(f" {k}={v}" for k, v in env.items())
        cu = [0, 100, 164, 300] if varlen else None
        x, kw = _inputs(kind, 300 if varlen else 320, 2, K, V, dtypes[dt], cu=cu, state=state)
        _run_op(kind, x, kw)
    os.environ.clear()
    os.environ.update(base_env)
    if shard == n_shards - 1:
        os.environ["LINSCALE_CE_BACKEND"] = "triton"
        _xent(rec)
    Path(out_path).write_text(json.dumps(list(rec.launches.values())))


# --------------------------------------------------------------------------------------------
# compile (real compiler, no GPU)
# --------------------------------------------------------------------------------------------


def _ptxas_stats(log: str) -> dict:
    """Registers and spills from ptxas's ``-v`` log (Triton passes ``-v``; the log is printed
    with ``TRITON_DUMP_PTXAS_LOG=1``)."""
    out = {}
    for key, pat in (
        ("n_regs", r"Used (\d+) registers"),
        ("spill_stores", r"(\d+) bytes spill stores"),
        ("spill_loads", r"(\d+) bytes spill loads"),
        ("stack", r"(\d+) bytes stack frame"),
    ):
        m = re.search(pat, log)
        out[key] = int(m.group(1)) if m else None
    return out


def _cuobjdump_stats(cubin: bytes) -> dict:
    """Fallback when the kernel came from Triton's cache (no ptxas log): registers and stack
    from ``cuobjdump --dump-resource-usage``."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run(
            [str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True
        )
    m = re.search(r"REG:(\d+) STACK:(\d+)", res.stdout)
    regs, stack = (int(m.group(1)), int(m.group(2))) if m else (None, None)
    return {"n_regs": regs, "spill_stores": None, "spill_loads": None, "stack": stack}


def jit_function(module: str, name: str):
    return getattr(importlib.import_module(module), name)


def compile_one(launch: dict) -> dict:
    """Compile one recorded launch for sm_90; returns its resources or the compiler's error."""
    from triton.compiler import ASTSource

    out = {k: launch[k] for k in ("module", "name", "signature", "constexprs", "options")}
    out["error"] = None
    try:
        fn = jit_function(launch["module"], launch["name"])
        src = ASTSource(
            fn=fn,
            signature=launch["signature"],
            constexprs={tuple(p): v for p, v in launch["constexprs"]},
            attrs={tuple(p): v for p, v in launch["attrs"]},
        )
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            ck = triton.compile(src, target=_target(), options=dict(launch["options"]))
        stats = _ptxas_stats(log.getvalue())
        if stats["n_regs"] is None:
            stats = _cuobjdump_stats(ck.asm["cubin"])
        out.update(stats, shared=ck.metadata.shared)
    except Exception as exc:  # noqa: BLE001 - every failure goes back to the test
        msg = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        out["error"] = msg if len(msg) < 6000 else msg[:3000] + "\n...\n" + msg[-3000:]
        return out
    if out["shared"] > SM90_MAX_SHARED:
        msg = f"OutOfResources: needs {out['shared']} B of shared memory, sm_90 has at most"
        msg += f" {SM90_MAX_SHARED}"
        if launch["stage1_fallback"] and launch["options"].get("num_stages", 3) > 1:
            # the launcher catches this and relaunches with num_stages=1: that one has to fit
            retry = dict(launch, options=dict(launch["options"], num_stages=1))
            retry["stage1_fallback"] = False
            out["fallback"] = compile_one(retry)
            if out["fallback"]["error"] is not None:
                out["error"] = f"{msg}; its num_stages=1 fallback: {out['fallback']['error']}"
        else:
            out["error"] = msg
    return out


def _compile_many(launches: list[dict]) -> list[dict]:
    # one process per core (each holds torch and triton, a few hundred MB), at most 8
    jobs = int(os.environ.get("SM90_COMPILE_JOBS", "0")) or min(os.cpu_count() or 1, 8)
    if jobs == 1 or len(launches) == 1:
        return [compile_one(x) for x in launches]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(compile_one, launches))


def _check_env() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("compiling needs TRITON_INTERPRET unset")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    # the escape hatch would let exactly the bug class this guards against compile
    os.environ.pop("TRITON_ALLOW_NON_CONSTEXPR_GLOBALS", None)


def compile_all(in_path: str, out_path: str) -> None:
    _check_env()
    launches = json.loads(Path(in_path).read_text())
    results = _compile_many(launches)
    for launch, r in zip(launches, results):
        r["cases"] = launch["cases"]
    Path(out_path).write_text(json.dumps({"results": results, "kernels": _all_kernels()}))


def _all_kernels() -> list[str]:
    """``module:name`` of every ``@triton.jit`` function named ``*_kernel`` in the package (the
    launched ones: the helpers have other names), to check that each was recorded."""
    import pkgutil

    from triton.runtime.jit import JITFunction

    pkg = importlib.import_module(PACKAGE)
    names = set()
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{PACKAGE}.{info.name}")
        for attr, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and attr.endswith("_kernel"):
                names.add(f"{obj.fn.__module__}:{obj.fn.__qualname__}")
    return sorted(names)


def selfcheck(out_path: str) -> None:
    _check_env()
    names = ("selfcheck_plain_global_kernel", "selfcheck_constexpr_global_kernel")
    results = _compile_many([selfcheck_launch(n) for n in names])
    Path(out_path).write_text(json.dumps(dict(zip(names, results))))


def interpret_selfcheck() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("interpret-selfcheck needs TRITON_INTERPRET=1")
    import torch

    x = torch.zeros(100)
    selfcheck_plain_global_kernel[(1,)](x, 100, BLOCK=128)
    print("INTERPRETED", float(x[0]))


if __name__ == "__main__":
    mode, rest = sys.argv[1], sys.argv[2:]
    if mode == "record":
        record(rest[0], *map(int, rest[1:]))
    elif mode == "compile":
        compile_all(rest[0], rest[1])
    elif mode == "selfcheck":
        selfcheck(rest[0])
    elif mode == "interpret-selfcheck":
        interpret_selfcheck()
    else:
        raise SystemExit(f"unknown mode {mode!r}")
