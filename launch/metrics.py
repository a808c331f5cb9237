"""Throughput, MFU and memory figures, and the per-run metrics JSONL."""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

import torch

__all__ = ["MetricsWriter", "model_flops_per_token", "peak_flops", "peak_memory_gb"]

# Measured bf16 dense matmul ceilings (shared/DESIGN.md, shared/GPU.md, KINDS.md).
_PEAK_TFLOPS = {"H100": 729.0, "H200": 790.0}


def peak_flops(device: torch.device) -> float | None:
    """The card's bf16 matmul ceiling in FLOP/s (LINSCALE_PEAK_TFLOPS overrides); None on CPU."""
    if "LINSCALE_PEAK_TFLOPS" in os.environ:
        return float(os.environ["LINSCALE_PEAK_TFLOPS"]) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tf in _PEAK_TFLOPS.items():
        if key in name:
            return tf * 1e12
    return None


def model_flops_per_token(num_params: int) -> float:
    """``6 * params``: the forward+backward FLOPs per token used for MFU (as in DESIGN.md).

    It leaves out the attention's own FLOPs, so it under-counts softmax layers at long T.
    """
    return 6.0 * num_params


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak RSS on CPU, in GB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * (1 if sys.platform != "darwin" else 1 / 1024) / 1e6


class MetricsWriter:
    """Appends one JSON object per record to ``<run>/metrics.jsonl`` (rank 0 only)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
