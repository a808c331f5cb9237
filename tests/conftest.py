"""Shared test set-up: small thread counts (CI has 2 cores) and a repo-root import path."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("LINSCALE_TEST", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
