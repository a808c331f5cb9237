"""Checkpoints with torch.distributed.checkpoint (DCP): model and optimizer (sharded or not),
plus per-rank trainer state (step, scheduler, data position, RNG).

A checkpoint is written to ``step_NNNNNNNN.tmp/`` and renamed to ``step_NNNNNNNN/`` only when
every rank has finished, so a crash never leaves a half-written checkpoint that looks complete.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

__all__ = ["latest_checkpoint", "load_checkpoint", "save_checkpoint"]

# Optimizer state keyed by parameter name, one entry per parameter (hyper-parameters included):
# pipeline ranks hold different parameters, and DCP keeps one copy of non-tensor entries, so a
# nested param_groups list would come back naming another rank's parameters.
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def latest_checkpoint(root: str | Path) -> Path | None:
    """The complete checkpoint folder with the highest step under ``root`` (None if none)."""
    root = Path(root)
    if not root.is_dir():
        return None
    steps = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _STEP_DIR.match(p.name)) and (p / ".complete").is_file()
    ]
    return max(steps)[1] if steps else None


def save_checkpoint(
    root: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    *,
    keep_last: int = 2,
) -> Path:
    """Write the checkpoint of ``step`` (all ranks must call this)."""
    root = Path(root)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if _rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    msd, osd = get_state_dict(model, optimizer, options=_OPTIONS)
    with warnings.catch_warnings():
        # Single-process runs have no process group; DCP says so on every call.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
    part = tmp / f"trainer_rank{_rank():05d}.pt"
    torch.save(trainer_state, str(part) + ".part")
    os.replace(str(part) + ".part", part)
    _barrier()
    if _rank() == 0:
        (tmp / ".complete").write_text(str(step))
        old = root / f"step_{step:08d}.old"
        if final.exists():  # re-saving a step: keep the old copy until the new one is in place
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        done = sorted(
            (int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))
        )
        for _, stale in done[:-keep_last]:
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(
    path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict:
    """Load model and optimizer in place; return this rank's trainer state."""
    path = Path(path)
    msd, osd = get_state_dict(model, optimizer, options=_OPTIONS)
    state = {"model": msd, "optim": osd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=dataclasses.replace(_OPTIONS, strict=True),
    )
    part = path / f"trainer_rank{_rank():05d}.pt"
    if not part.is_file():
        raise FileNotFoundError(
            f"{part} is missing: the checkpoint was written with a different number of ranks"
        )
    return torch.load(part, weights_only=False)
