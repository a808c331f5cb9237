"""Triton kernels (interpreter, fp32) for the gated delta rule vs the fp64 naive oracle.

The kernels run in one subprocess per module with TRITON_INTERPRET=1 (see _triton_worker.py),
so the interpreter setting never leaks into other tests; each case is asserted separately.
"""

from __future__ import annotations

import pytest

from ._triton_run import run_worker
from ._triton_worker import CASES

pytest.importorskip("triton")
TOL = 1e-4


@pytest.fixture(scope="module")
def results():
    return run_worker("delta", timeout=240)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", [c[0] for c in CASES["delta"]])
def test_triton_matches_naive(results, case):
    errs = results[case]
    assert isinstance(errs, dict), errs
    bad = {n: e for n, e in errs.items() if not e < TOL}
    assert not bad, f"{case}: relative errors over {TOL}: {bad}"
    assert "o" in errs and "dq" in errs and "dk" in errs and "dv" in errs
