"""Whether no-decay linear attention stays inside fp16's range on positive features.

Positive features (``elu(x) + 1``, mean about 1) make every state entry, and so the output,
grow with the sequence. The script runs the Triton op in fp16 and bf16 on the same inputs at
8K, 32K and 128K tokens (B = 1, H = 4, K = V = 128) and prints the largest output of the fp32
reference, whether the op's output and gradients are finite, and its relative error::

    PYTHONPATH=. python benchmarks/fp16_range_probe.py

H100 result (``results/kernels_h100_s12_fp16_range_probe.txt``): the reference output
reaches 1.75e5 at 8K, past fp16's 65504, so the fp16 output holds inf at every length; bf16
stays finite with 1.7e-3 relative error.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models.ops as ops  # noqa: E402


def main() -> None:
    for T in (8192, 32768, 131072):
        torch.manual_seed(0)
        q, k, v = (F.elu(torch.randn(1, T, 4, 128, device="cuda")) + 1 for _ in range(3))
        for dt in (torch.float16, torch.bfloat16):
            xs = [t.to(dt).requires_grad_(True) for t in (q, k, v)]
            ref, _ = ops.chunk_linear_attn(*(t.detach().float() for t in xs), backend="reference")
            o, _ = ops.chunk_linear_attn(*xs, backend="triton")
            finite = bool(torch.isfinite(o).all())
            grads_finite = False
            if finite:
                o.float().pow(2).mean().backward()
                grads_finite = all(bool(torch.isfinite(x.grad).all()) for x in xs)
            err = ((o.float() - ref).norm() / ref.norm()).item()
            print(
                f"T={T} {dt}: max|o| (fp32 reference) {ref.abs().max().item():.3g}, "
                f"output finite {finite}, rel. error {err:.2e}, gradients finite {grads_finite}"
            )


if __name__ == "__main__":
    main()
