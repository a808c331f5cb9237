"""Rank-aware logging: rank 0 speaks, other ranks only warn (all speak with LINSCALE_LOG_ALL=1)."""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["get_logger", "setup_logging"]

_LOGGER = "linscale"


def setup_logging(rank: int = 0) -> logging.Logger:
    logger = logging.getLogger(_LOGGER)
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[%(asctime)s rank{rank}] %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    everyone = os.environ.get("LINSCALE_LOG_ALL", "0") == "1"
    logger.setLevel(logging.INFO if rank == 0 or everyone else logging.WARNING)
    logger.propagate = False
    return logger


def get_logger() -> logging.Logger:
    return logging.getLogger(_LOGGER)
