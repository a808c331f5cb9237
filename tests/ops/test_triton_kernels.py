"""Triton kernels (interpreter, fp32) against the fp64 naive oracle: linear / scalar-decay /
GLA ("nondelta") and the gated delta rule ("delta").

The kernels of each family run in one subprocess with TRITON_INTERPRET=1 (see
_triton_worker.py), so the interpreter setting never leaks into other tests; each case is
asserted separately.
"""

from __future__ import annotations

import pytest

from ._triton_run import run_worker
from ._triton_worker import CASES

pytest.importorskip("triton")
TOL = 1e-4
_RESULTS: dict[str, dict] = {}


def family_results(family: str) -> dict:
    """One interpreter subprocess per family, shared by that family's cases."""
    if family not in _RESULTS:
        _RESULTS[family] = run_worker(family, timeout=240)
    return _RESULTS[family]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "family, case", [(family, c[0]) for family in ("nondelta", "delta") for c in CASES[family]]
)
def test_triton_matches_naive(family, case):
    errs = family_results(family)[case]
    assert isinstance(errs, dict), errs
    bad = {n: e for n, e in errs.items() if not e < TOL}
    assert not bad, f"{case}: relative errors over {TOL}: {bad}"
    assert "o" in errs and "dq" in errs and "dk" in errs and "dv" in errs
