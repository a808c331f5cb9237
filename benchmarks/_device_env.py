"""Environment the shared multi-GPU device machines need (shared/GPU.md): NVLink multicast
(NVLS) off for NCCL, symmetric memory and NVSHMEM. Values already set are kept, and child
processes inherit them. Imports nothing heavy, so scripts can call it before importing torch."""

from __future__ import annotations

import os

__all__ = ["disable_nvlink_multicast"]

NVLS_OFF = (
    ("NCCL_NVLS_ENABLE", "0"),
    ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
    ("NVSHMEM_DISABLE_NVLS", "1"),
)


def disable_nvlink_multicast() -> None:
    """Set the NVLS-off variables unless the environment already sets them."""
    for key, value in NVLS_OFF:
        os.environ.setdefault(key, value)
