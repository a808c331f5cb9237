"""How many block forwards each pipeline schedule runs per step, with and without activation
checkpointing (CPU, gloo, 2 pipeline ranks; counts, not times, so a CPU run is meaningful).

1F1B with full checkpointing runs each block's forward twice per microbatch (forward +
recompute). The zero-bubble schedules' split backward runs it three times with linscale's
merged weight pass (``--zb-backward merged``, parallel/pipeline_weight_grad.py), once per
parameter group more with torch's own per-group pass (``split``), and twice with the fused
backward (``fused``: no split).

    python benchmarks/pipeline_recompute.py --out benchmarks/results/pipeline_recompute_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.dist_harness import run_ranks  # noqa: E402

SCHEDULES = {"1F1B": 1, "Interleaved1F1B": 2, "ZBVZeroBubble": 2, "InterleavedZeroBubble": 2}


def _worker(rank, world, schedule, per_rank, ac, microbatches, layers):
    import models.llama as ml
    from launch.config import load_config
    from launch.trainer import Trainer

    calls = [0]
    original = ml.TransformerBlock.forward

    def counted(self, *a, **k):
        calls[0] += 1
        return original(self, *a, **k)

    ml.TransformerBlock.forward = counted
    cfg = load_config(
        None,
        [
            "model.dim=64",
            "model.ffn_dim=128",
            "model.n_heads=2",
            f"model.n_layers={layers}",
            "training.seq_len=64",
            f"training.batch_size={microbatches}",
            "data.max_files=20",
            "logging.progress=false",
            "checkpoint.enabled=false",
            "training.steps=2",
            "parallel.pp=2",
            f"parallel.pp_schedule={schedule}",
            f"parallel.pp_stages_per_rank={per_rank}",
            f"parallel.pp_microbatches={microbatches}",
            f"parallel.activation_checkpointing={ac}",
            "logging.run_dir=/tmp/linscale_recompute",
        ],
    )
    trainer = Trainer(cfg)
    trainer.train_step()
    calls[0] = 0
    t0 = time.perf_counter()
    trainer.train_step()
    return calls[0], time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results/pipeline_recompute_cpu.json")
    ap.add_argument(
        "--zb-backward",
        choices=("auto", "split", "merged", "fused"),
        default="auto",
        help="the zero-bubble schedules' backward (LINSCALE_PP_ZB_BACKWARD; split = torch's own "
        "input pass and per-group weight pass)",
    )
    ns = ap.parse_args()
    os.environ["LINSCALE_PP_ZB_BACKWARD"] = ns.zb_backward  # inherited by the spawned ranks
    rows = []
    for schedule, per_rank in SCHEDULES.items():
        for ac in ("none", "full"):
            res = run_ranks(_worker, 2, schedule, per_rank, ac, ns.microbatches, ns.layers)
            row = {
                "schedule": schedule,
                "activation_checkpointing": ac,
                "block_forwards_per_rank": [r[0] for r in res],
                "ideal": ns.layers // 2 * ns.microbatches * (2 if ac == "full" else 1),
                "cpu_step_s": [round(r[1], 3) for r in res],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = {
        "machine": f"CPU ({platform.machine()}), gloo, 2 ranks",
        "python": platform.python_version(),
        "torch": __import__("torch").__version__,
        "command": " ".join(sys.argv),
        "zb_backward": ns.zb_backward,
        "date": datetime.now(timezone.utc).isoformat(),
        "rows": rows,
    }
    Path(ns.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
