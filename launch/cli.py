"""The ``linscale`` command: train, report, bench, slurm.

User mistakes (bad config, missing files) print one line naming the field and exit with 2,
before any work is done and without a traceback.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from launch.config import ConfigError, load_config

__all__ = ["main"]

REPO_ROOT = Path(__file__).resolve().parent.parent


def _train(ns: argparse.Namespace) -> int:
    cfg = load_config(ns.config, ns.set)
    from launch.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        history = trainer.train()
    finally:
        from dist import destroy_distributed

        destroy_distributed()
    if trainer.rank == 0 and not history:
        print(
            f"nothing to do: the run in {cfg.run_path()} is already at step {trainer.step} of "
            f"{cfg.training.steps}; use another logging.name or checkpoint.resume=never"
        )
    if trainer.rank == 0 and history:
        first, last = history[0], history[-1]
        print(
            f"trained {len(history)} steps: loss {first.loss:.4f} -> {last.loss:.4f}; "
            f"metrics in {cfg.run_path() / 'metrics.jsonl'}"
        )
    return 0


def _report(ns: argparse.Namespace) -> int:
    from launch.report import write_scaling_report

    out = write_scaling_report(ns.results, ns.out)
    print(f"wrote {out}")
    return 0


def _bench(ns: argparse.Namespace) -> int:
    script = REPO_ROOT / "benchmarks" / f"{ns.name}.py"
    if not script.is_file():
        names = sorted(p.stem for p in (REPO_ROOT / "benchmarks").glob("*.py"))
        raise ConfigError(f"unknown benchmark {ns.name!r}; available: {', '.join(names)}")
    env = dict(
        os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    return subprocess.call([sys.executable, str(script), *ns.args], env=env)


def _slurm(ns: argparse.Namespace) -> int:
    from launch.slurm import render_sbatch

    text = render_sbatch(
        nodes=ns.nodes,
        gpus_per_node=ns.gpus_per_node,
        config=ns.config,
        overrides=ns.set,
        job_name=ns.job_name,
        time=ns.time,
        partition=ns.partition,
    )
    if ns.out:
        Path(ns.out).write_text(text)
        print(f"wrote {ns.out}; submit with: sbatch {ns.out}")
    else:
        sys.stdout.write(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="linscale", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command")

    tr = sub.add_parser("train", help="train a model (defaults: tiny model, stdlib corpus)")
    tr.add_argument("--config", "-c", help="YAML run config (see configs/)")
    tr.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one config field; repeatable",
    )
    tr.set_defaults(func=_train)

    rp = sub.add_parser("report", help="scaling-efficiency report (table + plot) from results")
    rp.add_argument("results", nargs="+", help="benchmark JSON files")
    rp.add_argument("--out", default="scaling_report", help="output prefix (.md and .png)")
    rp.set_defaults(func=_report)

    be = sub.add_parser("bench", help="run a benchmark script from benchmarks/")
    be.add_argument("name", help="kernels, sp_scaling, pipeline, ...")
    be.add_argument("args", nargs=argparse.REMAINDER)
    be.set_defaults(func=_bench)

    sl = sub.add_parser("slurm", help="write an sbatch script for multi-node torchrun")
    sl.add_argument("--nodes", type=int, default=1)
    sl.add_argument("--gpus-per-node", type=int, default=8)
    sl.add_argument("--config", "-c", required=True)
    sl.add_argument("--set", action="append", default=[])
    sl.add_argument("--job-name", default="linscale")
    sl.add_argument("--time", default="04:00:00")
    sl.add_argument("--partition", default=None)
    sl.add_argument("--out", "-o", help="file to write (stdout when absent)")
    sl.set_defaults(func=_slurm)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    ns = ap.parse_args(argv)
    if ns.command is None:
        ap.print_help()
        return 2
    try:
        return ns.func(ns)
    except ConfigError as e:
        # Every rank of a multi-process launch reads the same config: one of them speaks.
        if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
            print(f"linscale: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("linscale: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
