"""Pipeline parallelism composed with dp, sp and FSDP on 4 gloo ranks: 5 training steps give
the single-process losses, gradient norms and final parameters, to fp32 rounding.

Every case runs the real trainer from config alone (see :mod:`tests.parallel.pp_harness`).
The tiny model has tied embeddings, so every case also checks the last stage's copy of the
embedding against the single tied matrix.
"""

from __future__ import annotations

import pytest

from tests.dist_harness import run_ranks
from tests.parallel.pp_harness import resume_worker, run_case

PP2 = ["parallel.pp=2"]
CASES = {  # id: (parallel overrides, model overrides)
    "pp2xdp2-1F1B-accum2": (
        [
            *PP2,
            "parallel.dp=2",
            "parallel.pp_schedule=1F1B",
            "parallel.pp_microbatches=2",
            "training.grad_accum=2",
        ],
        [],
    ),
    "pp2xsp2-GPipe-zigzag": (
        [
            *PP2,
            "parallel.sp=2",
            "parallel.pp_schedule=GPipe",
            "parallel.pp_microbatches=4",
            "parallel.layout=zigzag",
        ],
        [],
    ),
    "pp2xsp2-1F1B-fsdp": (
        [
            *PP2,
            "parallel.sp=2",
            "parallel.pp_schedule=1F1B",
            "parallel.pp_microbatches=2",
            "parallel.fsdp=true",
        ],
        [],
    ),
    "pp4-Interleaved1F1B": (
        [
            "parallel.pp=4",
            "parallel.pp_schedule=Interleaved1F1B",
            "parallel.pp_stages_per_rank=2",
            "parallel.pp_microbatches=4",
        ],
        ["model.n_layers=8"],
    ),
    "pp2xdp2-ZBVZeroBubble-fsdp": (
        [
            *PP2,
            "parallel.dp=2",
            "parallel.pp_schedule=ZBVZeroBubble",
            "parallel.pp_stages_per_rank=2",
            "parallel.pp_microbatches=4",
            "parallel.fsdp=true",
        ],
        [],
    ),
    # Full checkpointing: the fused backward, and the shared tied head on rank 0.
    "pp2xdp2-ZBVZeroBubble-ckpt": (
        [
            *PP2,
            "parallel.dp=2",
            "parallel.pp_schedule=ZBVZeroBubble",
            "parallel.pp_stages_per_rank=2",
            "parallel.pp_microbatches=4",
            "parallel.activation_checkpointing=full",
        ],
        [],
    ),
    # The deferred weight pass (parallel/deferred_wgrad.py), the shared tied head on rank 0.
    "pp2xdp2-ZBVZeroBubble": (
        [
            *PP2,
            "parallel.dp=2",
            "parallel.pp_schedule=ZBVZeroBubble",
            "parallel.pp_stages_per_rank=2",
            "parallel.pp_microbatches=4",
        ],
        [],
    ),
    # A wide vocabulary makes the head weigh ~4 blocks: the end stages hold no layer.
    "pp2xdp2-ZBVZeroBubble-empty-ends": (
        [
            *PP2,
            "parallel.dp=2",
            "parallel.pp_schedule=ZBVZeroBubble",
            "parallel.pp_stages_per_rank=2",
            "parallel.pp_microbatches=4",
        ],
        ["model.vocab_size=4096"],
    ),
    # An explicit split (parallel.pp_stage_layers), the last stage empty.
    "pp2xdp2-ZBVZeroBubble-manual-split": (
        [
            *PP2,
            "parallel.dp=2",
            "parallel.pp_schedule=ZBVZeroBubble",
            "parallel.pp_stages_per_rank=2",
            "parallel.pp_microbatches=4",
            "parallel.pp_stage_layers=[1,1,2,0]",
        ],
        [],
    ),
    "pp2xdp2-InterleavedZeroBubble": (
        [
            *PP2,
            "parallel.dp=2",
            "parallel.pp_schedule=InterleavedZeroBubble",
            "parallel.pp_stages_per_rank=2",
            "parallel.pp_microbatches=2",
        ],
        [],
    ),
}
SPLITS = {  # cost-balanced splits the cases must produce (layer names per stage)
    "pp4-Interleaved1F1B": [[str(i)] for i in range(8)],
    # Rank 0 holds the embedding, and a head of ~4 blocks: both its stages get no layer.
    "pp2xdp2-ZBVZeroBubble-empty-ends": [[], ["0", "1"], ["2", "3"], []],
    "pp2xdp2-1F1B-accum2": [["0", "1"], ["2", "3"]],
    "pp2xdp2-ZBVZeroBubble-manual-split": [["0"], ["1"], ["2", "3"], []],
}


# Whether rank 0 (first and last stage under ZBV) holds a copy of the tied head: only with FSDP
# (the stages are sharded apart).
HEAD_COPY_ON_RANK0 = {
    "pp2xdp2-ZBVZeroBubble-ckpt": False,
    "pp2xdp2-ZBVZeroBubble-fsdp": True,
    "pp2xdp2-ZBVZeroBubble": False,
}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_matches_single_process(case, tmp_path_factory):
    parallel, model = CASES[case]
    results = run_case(parallel, model, tmp_path_factory)
    if case in SPLITS:
        assert results[0]["split"] == SPLITS[case]
    if case in HEAD_COPY_ON_RANK0:
        assert ("output.weight" in results[0]["params"]) == HEAD_COPY_ON_RANK0[case]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["split", "deferred"])
def test_zero_bubble_backward_modes_with_checkpointing(mode, monkeypatch, tmp_path_factory):
    """The backwards chosen by LINSCALE_PP_ZB_BACKWARD, with full checkpointing and no FSDP:
    torch's split weight pass (it walks each stage's parameters(): the shared head's gradient
    must not be missed) and the deferred pass (each block's down projection keeps its own
    backward)."""
    monkeypatch.setenv("LINSCALE_PP_ZB_BACKWARD", mode)
    parallel = [
        *PP2,
        "parallel.dp=2",
        "parallel.pp_schedule=ZBVZeroBubble",
        "parallel.pp_stages_per_rank=2",
        "parallel.pp_microbatches=4",
        "parallel.activation_checkpointing=full",
    ]
    results = run_case(parallel, [], tmp_path_factory)
    assert "output.weight" not in results[0]["params"]


@pytest.mark.timeout(180)
def test_pipeline_checkpoint_resume_is_exact(tmp_path):
    """ZB-V (stage 0 and the last stage with its tied-head copy on rank 0) x dp2: a run cut at
    step 2 and resumed from its DCP checkpoint continues with the same losses."""
    extra = [
        *PP2,
        "parallel.dp=2",
        "parallel.pp_schedule=ZBVZeroBubble",
        "parallel.pp_stages_per_rank=2",
        "parallel.pp_microbatches=4",
    ]
    for straight, resumed in run_ranks(resume_worker, 4, str(tmp_path), extra):
        assert resumed == straight[2:]
