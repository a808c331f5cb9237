"""linscale distributed runtime: ParallelDims + DeviceMesh, init from torchrun/SLURM,
rank-aware logging, seeding and DCP checkpoints."""

from dist.init import DistEnv, destroy_distributed, init_distributed, read_dist_env
from dist.logging import get_logger, setup_logging
from dist.parallel_dims import ParallelDims
from dist.seed import get_rng_state, set_rng_state, set_seed

__all__ = [
    "DistEnv",
    "ParallelDims",
    "destroy_distributed",
    "get_logger",
    "get_rng_state",
    "init_distributed",
    "read_dist_env",
    "set_rng_state",
    "set_seed",
    "setup_logging",
]
