"""Data x sequence parallelism without PP on 4 gloo ranks, with replicated parameters (the
trainer's all-reduce over dp_sp) and with FSDP2 over the flattened dp_sp mesh: 5 training steps
give the single-process losses, gradient norms and final parameters, to fp32 rounding. A
gradient reduced twice (over dp and again over dp_sp) or missed over sp would fail."""

from __future__ import annotations

import pytest

from tests.parallel.pp_harness import run_case

CASES = {
    "dp2xsp2-allreduce": ["parallel.dp=2", "parallel.sp=2"],
    "dp2xsp2-fsdp": ["parallel.dp=2", "parallel.sp=2", "parallel.fsdp=true"],
}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", list(CASES))
def test_dp_sp_matches_single_process(case, tmp_path_factory):
    run_case(CASES[case], [], tmp_path_factory)
