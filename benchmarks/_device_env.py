"""Environment the shared multi-GPU device machines need (shared/GPU.md): NVLink multicast
(NVLS) off for NCCL, symmetric memory and NVSHMEM. Values already set are kept, and child
processes inherit them. Imports nothing heavy, so scripts can call it before importing torch.
Also :func:`environ`, the benchmarks' temporary setting of ``LINSCALE_*`` switches."""

from __future__ import annotations

import contextlib
import os

__all__ = ["disable_nvlink_multicast", "environ"]

NVLS_OFF = (
    ("NCCL_NVLS_ENABLE", "0"),
    ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
    ("NVSHMEM_DISABLE_NVLS", "1"),
)


def disable_nvlink_multicast() -> None:
    """Set the NVLS-off variables unless the environment already sets them."""
    for key, value in NVLS_OFF:
        os.environ.setdefault(key, value)


@contextlib.contextmanager
def environ(env: dict):
    """Set environment variables for the duration of the block, then restore them."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
