"""Render the multi-node sbatch template in slurm/."""

from __future__ import annotations

import shlex
from pathlib import Path

from launch.config import ConfigError

__all__ = ["render_sbatch"]

TEMPLATE = Path(__file__).resolve().parent.parent / "slurm" / "torchrun_multinode.sbatch"


def render_sbatch(
    *,
    nodes: int,
    gpus_per_node: int,
    config: str,
    overrides: list[str],
    job_name: str = "linscale",
    time: str = "04:00:00",
    partition: str | None = None,
    cpus_per_task: int | None = None,
) -> str:
    """The sbatch script text for ``nodes`` x ``gpus_per_node`` ranks running ``config``."""
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError(f"--nodes and --gpus-per-node must be >= 1, got {nodes}, {gpus_per_node}")
    if not Path(config).is_file():
        raise ConfigError(f"--config {config!r} does not exist")
    extra = "".join(f" \\\n    --set {shlex.quote(o)}" for o in overrides)
    return TEMPLATE.read_text().format(
        job_name=job_name,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        cpus_per_task=cpus_per_task or 8 * gpus_per_node,
        time=time,
        partition_line=f"#SBATCH --partition={partition}" if partition else "",
        config=shlex.quote(config),
        overrides=extra,
    )
