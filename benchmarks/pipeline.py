"""Pipeline-parallel benchmark: every schedule at pp = 1, 2, 4 with the rest of the GPUs as SP or
DP, through the real trainer (config alone), on one host.

    torchrun --nproc_per_node=4 benchmarks/pipeline.py --out benchmarks/results/pipeline.json
    torchrun --nproc_per_node=4 benchmarks/pipeline.py --quick         # smoke test, 8K tokens
    python benchmarks/pipeline.py --table benchmarks/results/pipeline.json   # README table
    python benchmarks/pipeline.py --merge a.json b.json --out benchmarks/results/pipeline.json

Per configuration (``linear-llama3-1b``, 32K tokens per sequence, bf16 autocast, full per-block
checkpointing, m = 8 microbatches of one sequence per pipeline, stages split by cost): step time,
tokens/s, MFU (6 N tokens / (step * world * peak)), peak memory (max over ranks), and the bubble:

- measured: ``1 - busy / step`` on the busiest rank, ``busy`` being the time of its stages'
  forward and backward actions (CUDA events around ``forward_one_chunk``,
  ``backward_one_chunk`` and ``backward_weight_one_chunk``), so P2P waits, FSDP and the
  optimizer count as bubble;
- theory: ``(p-1)/(m+p-1)`` for GPipe and 1F1B, ``(p-1)/(v m+p-1)`` for Interleaved1F1B with v
  stages per rank, 0 for the zero-bubble schedules (when F, B and W take equal time);
- ``vs_ideal``: step / (busy / (1 - theory)), i.e. against ``(m+p-1)`` stage times for 1F1B.

Targets (issue 4): 1F1B within 1.15x of the ideal at m = 8; a zero-bubble schedule faster than
1F1B at the same memory. ``--only`` (names such as ``pp2-sp2-1F1B``, or prefixes such as
``pp4``) splits the full run into calls that fit a 10-minute limit.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.config import load_config  # noqa: E402
from launch.metrics import peak_flops  # noqa: E402

SCHEDULES = ["GPipe", "1F1B", "Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble"]
MULTI = {"Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble"}


def configs(world: int, args) -> list[dict]:
    """The (pp, dp, sp, schedule) grid for ``world`` GPUs, filtered by the CLI."""
    out = []
    for pp in args.pp:
        if world % pp:
            continue
        rest = world // pp
        kinds = [k for k in args.rest if rest > 1] or ["none"]
        for kind in kinds:
            sp = rest if kind == "sp" else 1
            dp = rest if kind == "dp" else 1
            for sched in [None] if pp == 1 else args.schedules:
                v = 2 if sched in MULTI else 1
                name = (
                    f"pp{pp}"
                    + ("" if kind == "none" else f"-{kind}{rest}")
                    + (f"-{sched}" if sched else "")
                )
                if args.only and not any(name == o or name.startswith(o + "-") for o in args.only):
                    continue
                out.append(
                    {
                        "name": name,
                        "pp": pp,
                        "dp": dp,
                        "sp": sp,
                        "schedule": sched,
                        "stages_per_rank": v,
                        "microbatches": args.microbatches if pp > 1 else 1,
                    }
                )
    return out


def overrides(c: dict, args, run_dir: str) -> list[str]:
    per_dp = c["microbatches"] if c["pp"] > 1 else args.pp1_batch
    o = [
        f"model.preset={args.preset}",
        f"training.seq_len={args.seq_len}",
        f"training.batch_size={per_dp * c['dp']}",
        "training.grad_accum=1",
        "training.steps=1000",
        "training.warmup_steps=0",
        "training.lr=1e-4",
        f"training.device={'cpu' if args.cpu else 'cuda'}",
        f"training.dtype={'fp32' if args.cpu else 'bf16'}",
        f"parallel.pp={c['pp']}",
        f"parallel.dp={c['dp']}",
        f"parallel.sp={c['sp']}",
        f"parallel.activation_checkpointing={args.ac}",
        f"parallel.fsdp={args.fsdp}",
        "data.source=stdlib",
        "data.max_files=40",
        "checkpoint.enabled=false",
        "logging.progress=false",
        f"logging.run_dir={run_dir}",
        f"logging.name={c['name']}",
    ]
    if c["pp"] > 1:
        o += [
            f"parallel.pp_schedule={c['schedule']}",
            f"parallel.pp_stages_per_rank={c['stages_per_rank']}",
            f"parallel.pp_microbatches={c['microbatches']}",
        ]
    return o + args.set


class StageTimer:
    """Sums the time of a rank's stage compute actions (CUDA events, or wall time on CPU).

    With ``mem_trace`` (CUDA) it also lists, per action, GB allocated:
    ``(stage, action, microbatch, peak since the previous action, before, peak during, after)``
    (the allocator's peak is reset around each action; :attr:`peak` keeps the overall one).
    """

    ACTIONS = ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk")
    SHORT = {"forward_one_chunk": "F", "backward_one_chunk": "B", "backward_weight_one_chunk": "W"}

    def __init__(self, stages, device: torch.device, mem_trace: bool = False) -> None:
        self.cuda = device.type == "cuda"
        self.mem_trace = mem_trace and self.cuda
        self.spans: list = []
        self.trace: list = []
        self.peak = 0
        for stage in stages:
            for name in self.ACTIONS:
                if hasattr(stage, name):
                    fn = self._wrap(getattr(stage, name))
                    if self.mem_trace:
                        fn = self._traced(fn, stage.stage_index, self.SHORT[name])
                    setattr(stage, name, fn)

    def _traced(self, fn, stage_index: int, action: str):
        def traced(*a, **kw):
            mb = a[0] if a else next(iter(kw.values()), None)
            gap = self._peak_since_reset()  # since the previous action (optimizer step etc.)
            before = torch.cuda.memory_allocated()
            out = fn(*a, **kw)
            peak = self._peak_since_reset()
            after = torch.cuda.memory_allocated()
            gb = [round(x / 1e9, 2) for x in (gap, before, peak, after)]
            self.trace.append((stage_index, action, mb, *gb))
            return out

        return traced

    def _peak_since_reset(self) -> int:
        """The allocator's peak since the last call (the benchmark's peak keeps the max)."""
        peak = torch.cuda.max_memory_allocated()
        self.peak = max(self.peak, peak)
        torch.cuda.reset_peak_memory_stats()
        return peak

    def _wrap(self, fn):
        def timed(*a, **kw):
            if self.cuda:
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record()
                out = fn(*a, **kw)
                end.record()
                self.spans.append((start, end))
            else:
                t0 = time.perf_counter()
                out = fn(*a, **kw)
                self.spans.append(time.perf_counter() - t0)
            return out

        return timed

    def take(self) -> float:
        """Busy seconds since the last call (after the step's device sync)."""
        if self.mem_trace:  # the rest of the step: gradient sync, clipping, optimizer
            gap, now = self._peak_since_reset(), torch.cuda.memory_allocated()
            self.trace.append((None, "end", None, round(gap / 1e9, 2), round(now / 1e9, 2)))
        if self.cuda:
            busy = sum(s.elapsed_time(e) for s, e in self.spans) / 1e3
        else:
            busy = sum(self.spans)
        self.spans.clear()
        return busy


def theory_bubble(c: dict) -> float:
    p, m, v = c["pp"], c["microbatches"], c["stages_per_rank"]
    if p == 1 or c["schedule"] in ("InterleavedZeroBubble", "ZBVZeroBubble"):
        return 0.0
    if c["schedule"] == "Interleaved1F1B":
        return (p - 1) / (v * m + p - 1)
    return (p - 1) / (m + p - 1)


def run_config(c: dict, args, run_dir: str) -> dict:
    """Build the trainer for ``c``, warm up, time ``args.steps`` steps; this rank's figures."""
    from launch.trainer import Trainer

    cfg = load_config(None, overrides(c, args, run_dir))
    trainer = Trainer(cfg)
    device = trainer.device
    timer = (
        StageTimer(trainer.pipeline.stages, device, mem_trace=args.mem_trace)
        if trainer.pipeline
        else None
    )
    first = None
    for _ in range(args.warmup):
        r = trainer.train_step()
        first = first or r  # step 1 from the seeded init: equal across schedules to rounding
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if timer:
        timer.take()
        timer.peak = 0
    steps, busy = [], []
    for _ in range(args.steps):
        if timer:
            timer.trace.clear()  # the last timed step's
        r = trainer.train_step()  # ends with a device sync
        steps.append(r.seconds)
        busy.append(timer.take() if timer else r.seconds)
    tokens = cfg.training.batch_size * cfg.training.seq_len
    row = {
        "step_s": sorted(steps)[len(steps) // 2],
        "busy_s": sorted(busy)[len(busy) // 2],
        "tokens": tokens,
        "loss": r.loss,
        "first_loss": first.loss if first else None,
        "first_grad_norm": first.grad_norm if first else None,
        "num_params": trainer.num_params,
        "peak_mem_gb": (
            max(torch.cuda.max_memory_allocated(device), timer.peak if timer else 0) / 1e9
            if device.type == "cuda"
            else None
        ),
        "split": trainer.pipeline.layer_split if trainer.pipeline else None,
        "mem_trace": timer.trace if timer and timer.mem_trace else None,
    }
    del trainer, timer
    _settle(device)
    return row


def _settle(device: torch.device, seconds: float = 3.0) -> None:
    """Let a deleted Trainer's memory go before the next row is built.

    DDP's gradient buckets stay referenced by their completed all-reduces for a moment after
    the Trainer is gone (4 x H100: 1.9-4.9 GB per rank right after deletion, 0.07 GB after a
    barrier, a device sync and 3 s), and could count in the next row's peak. (The pp1-dp4
    row's high peak on some ranks was not that: it stayed with this settling.)"""
    gc.collect()
    if device.type != "cuda":
        return
    torch.cuda.synchronize(device)
    if dist.is_initialized():
        dist.barrier()
    time.sleep(seconds)
    gc.collect()
    torch.cuda.empty_cache()


def summarise(c: dict, rows: list[dict], world: int, peak: float | None) -> dict:
    step = max(r["step_s"] for r in rows)
    busy = max(r["busy_s"] for r in rows)
    tokens = rows[0]["tokens"]
    theory = theory_bubble(c)
    out = dict(c)
    out.update(
        {
            "step_s": step,
            "tokens_per_s": tokens / step,
            "tokens": tokens,
            "mfu": 6.0 * rows[0]["num_params"] * tokens / (step * world * peak) if peak else None,
            "peak_mem_gb": max((r["peak_mem_gb"] or 0.0) for r in rows) or None,
            "busy_s": busy,
            "bubble_measured": 1.0 - busy / step if c["pp"] > 1 else None,
            "bubble_theory": theory if c["pp"] > 1 else None,
            "vs_ideal": step / (busy / (1.0 - theory)) if c["pp"] > 1 else None,
            "loss": rows[0]["loss"],
            # Step 1 (the first warm-up step, from the same seeded init for every
            # configuration): its loss and gradient norm must agree across schedules.
            "first_loss": rows[0]["first_loss"],
            "first_grad_norm": rows[0]["first_grad_norm"],
            "split": [len(s) for s in rows[0]["split"]] if rows[0]["split"] else None,
            # Per global rank: where the work and the memory sit (a rank holding the head and
            # the embedding, or more layers, shows up here).
            "busy_per_rank_s": [r["busy_s"] for r in rows],
            "peak_mem_per_rank_gb": [r["peak_mem_gb"] for r in rows],
        }
    )
    if any(r.get("mem_trace") for r in rows):
        out["mem_trace_per_rank"] = [r.get("mem_trace") for r in rows]
    return out


# The run settings a merged row carries from its part's meta.
RUN_KEYS = ("seq_len", "activation_checkpointing", "fsdp", "zb_backward", "command")


def _layout_key(r: dict) -> str:
    """``pp4-sp2``-style layout, with T and checkpointing when the row carries them (merged)."""
    key = r["name"].rsplit("-", 1)[0]
    if r.get("seq_len") is not None:
        key += f"@{r['seq_len']}-{r.get('activation_checkpointing')}"
    return key


def headline(rows: list[dict]) -> dict:
    """1F1B against its ideal, and the best zero-bubble schedule against 1F1B, per layout."""
    out = {}
    rows = [r for r in rows if "error" not in r]
    for r in rows:
        if r["schedule"] != "1F1B":
            continue
        key = _layout_key(r)
        h = {"1F1B_vs_ideal": r["vs_ideal"], "target_1F1B_vs_ideal": 1.15}
        zb = [
            z
            for z in rows
            if _layout_key(z) == key and z["schedule"] in ("InterleavedZeroBubble", "ZBVZeroBubble")
        ]
        if zb:
            best = min(zb, key=lambda z: z["step_s"])
            h.update(
                {
                    "best_zero_bubble": best["schedule"],
                    "zero_bubble_speedup": r["step_s"] / best["step_s"],
                    "zero_bubble_mem_ratio": (
                        best["peak_mem_gb"] / r["peak_mem_gb"] if r["peak_mem_gb"] else None
                    ),
                }
            )
        # Step 1 starts from the same init in every row of the layout: its loss and gradient
        # norm must agree across the schedules (a wrong gradient shows here first).
        same = [z for z in rows if _layout_key(z) == key and z.get("first_grad_norm")]
        if len(same) > 1:
            for field in ("first_loss", "first_grad_norm"):
                vals = [z[field] for z in same]
                h[f"{field}_rel_spread"] = (max(vals) - min(vals)) / abs(max(vals))
        out[key] = h
    return out


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_row(r: dict) -> None:
    print(
        f"{r['name']:<32} step {r['step_s']:7.3f} s  {r['tokens_per_s']:9.0f} tok/s  "
        f"MFU {_fmt(r['mfu'], '.3f')}  mem {_fmt(r['peak_mem_gb'], '.1f')} GB  "
        f"bubble {_fmt(r['bubble_measured'], '.3f')} (theory {_fmt(r['bubble_theory'], '.3f')})"
        f"  vs ideal {_fmt(r['vs_ideal'], '.3f')}  split {r['split']}  step-1 loss "
        f"{_fmt(r.get('first_loss'), '.6f')} norm {_fmt(r.get('first_grad_norm'), '.6f')}",
        flush=True,
    )


def markdown_table(path: str) -> str:
    data = json.loads(Path(path).read_text())
    m = data["meta"]
    lines = [
        f"{m['card']} x{m['world']}, torch {m['torch']}, {m['date'][:10]}, "
        f"{m['preset']}, {m['seq_len']} tokens/seq, m = {m['microbatches']}",
        "",
        "| config | step s | tokens/s | MFU | peak GB | bubble meas. | bubble theory | "
        "vs ideal | layers/stage |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        label = r["name"]
        if r.get("seq_len") is not None:  # a merged row: its own settings
            label += f" @{r['seq_len'] // 1024}K ac={r.get('activation_checkpointing')}"
            if r.get("zb_backward") not in (None, "auto") and r["schedule"] != "1F1B":
                label += f" ({r['zb_backward']})"
            words = (r.get("command") or "").split()
            label += "".join(f" {b}" for a, b in zip(words, words[1:]) if a == "--set")
        if "error" in r:
            lines.append(f"| {label} | failed: {r['error'][:60]} |" + " |" * 7)
            continue
        lines.append(
            f"| {label} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | "
            f"{_fmt(r['mfu'], '.3f')} | {_fmt(r['peak_mem_gb'], '.1f')} | "
            f"{_fmt(r['bubble_measured'], '.3f')} | {_fmt(r['bubble_theory'], '.3f')} | "
            f"{_fmt(r['vs_ideal'], '.2f')} | {r['split'] or '-'} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str]):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 8K tokens, sp only, 1F1B and ZBVZeroBubble, 2 steps",
    )
    ap.add_argument("--preset", default="linear-llama3-1b")
    ap.add_argument("--seq-len", type=int, default=32768)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--pp", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4])
    ap.add_argument(
        "--rest",
        type=lambda s: s.split(","),
        default=["sp", "dp"],
        help="what the GPUs beyond pp do: sp, dp or both",
    )
    ap.add_argument("--schedules", type=lambda s: s.split(","), default=SCHEDULES)
    ap.add_argument("--only", type=lambda s: s.split(","), default=None)
    ap.add_argument("--pp1-batch", type=int, default=1, help="sequences per dp rank at pp=1")
    ap.add_argument("--ac", default="full", help="parallel.activation_checkpointing")
    ap.add_argument("--fsdp", action="store_true")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--cpu", action="store_true", help="gloo on CPU (plumbing check only)")
    ap.add_argument(
        "--mem-trace",
        action="store_true",
        help="record each stage action's allocated / peak GB in the last step (CUDA)",
    )
    ap.add_argument("--set", action="append", default=[], help="extra config override a.b=v")
    ap.add_argument("--table", default=None, help="print the README table of a JSON and exit")
    ap.add_argument(
        "--merge",
        nargs="+",
        default=None,
        help="join the rows of several JSONs (split runs) into --out and exit",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.seq_len = min(args.seq_len, 8192)
        args.rest, args.warmup, args.steps = ["sp"], 1, 2
        args.schedules = ["1F1B", "ZBVZeroBubble"]
    args.fsdp = "true" if args.fsdp else "false"
    return args


def _write(args, rows: list[dict], world: int) -> tuple[Path, dict]:
    """The JSON of the rows so far (rank 0; after every row, so a time limit loses little);
    returns its path and headline."""
    card = "cpu" if args.cpu else torch.cuda.get_device_name(0)
    meta = {
        "card": card,
        "world": world,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "preset": args.preset,
        "seq_len": args.seq_len,
        "microbatches": args.microbatches,
        "activation_checkpointing": args.ac,
        "fsdp": args.fsdp == "true",
        "zb_backward": os.environ.get("LINSCALE_PP_ZB_BACKWARD", "auto"),
        "command": " ".join(["torchrun", f"--nproc_per_node={world}", *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(),
    }
    result = {"meta": meta, "headline": headline(rows), "rows": rows}
    out = Path(
        args.out
        or f"benchmarks/results/pipeline{'_quick' if args.quick else ''}"
        f"_{card.replace(' ', '_')}_x{world}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return out, result["headline"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.table:
        print(markdown_table(args.table))
        return
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        # Each row keeps the settings of its part (parts may differ in T, checkpointing, ...).
        rows = [
            {**{k: part["meta"].get(k) for k in RUN_KEYS}, **r}
            for part in parts
            for r in part["rows"]
        ]
        meta = dict(parts[0]["meta"], command=" ; ".join(p["meta"]["command"] for p in parts))
        out = Path(args.out or "benchmarks/results/pipeline.json")
        out.write_text(
            json.dumps({"meta": meta, "headline": headline(rows), "rows": rows}, indent=1)
        )
        print(f"wrote {out}")
        return
    if not args.cpu:
        from _device_env import disable_nvlink_multicast  # benchmarks/ is sys.path[0]

        disable_nvlink_multicast()
    from launch.trainer import Trainer  # noqa: F401  (import errors before any work)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    grid = configs(world, args)
    if not grid:
        raise SystemExit(f"no configuration fits world size {world} with these filters")
    run_dir = tempfile.mkdtemp(prefix="pp_bench_")
    rows = []
    for c in grid:
        try:
            mine = run_config(c, args, run_dir)
        except Exception as e:  # noqa: BLE001 - recorded; the grid goes on if all ranks failed
            mine = {"error": f"{type(e).__name__}: {e}"[:400]}
            # Printed at once: when only this rank failed, the others may still wait in the
            # schedule's P2P and the gather below never completes.
            print(f"rank {rank} {c['name']} failed: {mine['error']}", file=sys.stderr, flush=True)
            gc.collect()
            if not args.cpu:
                torch.cuda.empty_cache()
        gathered = [None] * world
        if dist.is_initialized():
            dist.all_gather_object(gathered, mine)
        else:
            gathered = [mine]
        errors = [g["error"] for g in gathered if "error" in g]
        if errors:
            row = dict(c, error=errors[0])
            if rank == 0:
                print(f"{c['name']:<32} FAILED: {errors[0]}", flush=True)
        else:
            device = (
                torch.device("cuda", torch.cuda.current_device())
                if not args.cpu
                else torch.device("cpu")
            )
            row = summarise(c, gathered, world, peak_flops(device))
            if rank == 0:
                print_row(row)
        rows.append(row)
        if rank == 0:
            written = _write(args, rows, world)
    if rank == 0:  # the grid is never empty: the last row's write holds every row
        out, head = written
        print(json.dumps(head, indent=1))
        print(f"wrote {out}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _version(pkg: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:
        return None


if __name__ == "__main__":
    main()
