"""Data x sequence parallelism on 4 gloo ranks, with replicated parameters (the trainer's
gradient sum over dp_sp) and with FSDP2 over the flattened dp_sp mesh, and all three axes at
once on 8 ranks: 5 training steps give the single-process losses, gradient norms and final
parameters, to fp32 rounding. A gradient reduced twice (over dp and again over dp_sp) or missed
over sp would fail."""

from __future__ import annotations

import pytest

from tests.dist_harness import run_ranks
from tests.parallel.pp_harness import resume_worker, run_case

KEEP = ["parallel.fsdp=true", "parallel.fsdp_reshard_after_forward=false"]
CASES = {
    "dp2xsp2-allreduce": ["parallel.dp=2", "parallel.sp=2"],
    "dp2xsp2-fsdp": ["parallel.dp=2", "parallel.sp=2", "parallel.fsdp=true"],
    # The sp_scaling benchmark's headline setting: FSDP2 over the SP group, blocks kept
    # gathered from forward to backward, every block checkpointed.
    "sp4-fsdp-keep": ["parallel.sp=4", *KEEP, "parallel.activation_checkpointing=full"],
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


@pytest.mark.timeout(180)
def test_fsdp_sp_checkpoint_resume_is_exact(tmp_path):
    """dp2 x sp2 with FSDP2 (blocks kept gathered): a run cut at step 2 and resumed from its
    DCP checkpoint (sharded parameters and optimizer state) continues with the same losses."""
    extra = ["parallel.dp=2", "parallel.sp=2", *KEEP]
    for straight, resumed in run_ranks(resume_worker, 4, str(tmp_path), extra):
        assert resumed == straight[2:]
