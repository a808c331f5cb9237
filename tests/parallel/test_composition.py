"""Data x sequence parallelism on 4 gloo ranks, with replicated parameters (the trainer's
gradient sum over dp_sp) and with FSDP2 over the flattened dp_sp mesh, and all three axes at
once on 8 ranks: 5 training steps give the single-process losses, gradient norms and final
parameters, to fp32 rounding. A gradient reduced twice (over dp and again over dp_sp) or missed
over sp would fail."""

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


@pytest.mark.timeout(180)
def test_pp_dp_sp_on_eight_ranks(tmp_path_factory):
    """pp2 x dp2 x sp2, Interleaved1F1B, FSDP over each stage's dp_sp mesh of 4 ranks, the
    tied-embedding copy summed over 4 separate first/last-stage pairs."""
    results = run_case(
        [
            "parallel.pp=2",
            "parallel.dp=2",
            "parallel.sp=2",
            "parallel.pp_schedule=Interleaved1F1B",
            "parallel.pp_stages_per_rank=2",
            "parallel.pp_microbatches=2",
            "parallel.fsdp=true",
        ],
        [],
        tmp_path_factory,
        world=8,
    )
    assert results[0]["split"] == [["0"], ["1"], ["2"], ["3"]]
