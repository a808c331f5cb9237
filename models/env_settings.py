"""Checked reading of the ``LINSCALE_*`` environment switches (kernel choices and settings).

Kept free of triton so that code which must run without it (the loss, the op dispatch) can use
the same check and the same error message as the kernels.
"""

from __future__ import annotations

import os

__all__ = ["env_setting"]


def env_setting(name: str, default, allowed: tuple = (), *, minimum: int | None = None):
    """A setting from environment variable ``name``, of ``default``'s type (int or str):
    ``default`` when unset or empty. Read at every call, so it can change between calls (a
    kernel setting feeds a launch parameter or constexpr, part of Triton's cache key). Raises
    ValueError naming the variable when the value does not convert, is not one of ``allowed``
    (when given) or is below ``minimum`` (when given)."""
    raw = os.environ.get(name, "")
    if raw == "":
        return default
    try:
        val = type(default)(raw)
    except ValueError:
        val = None
    ok = val is not None and (not allowed or val in allowed)
    ok = ok and (minimum is None or val >= minimum)
    if not ok:
        want = f"one of {', '.join(map(str, allowed))}" if allowed else f"an integer >= {minimum}"
        raise ValueError(f"{name}={raw!r}: expected {want}")
    return val
