"""Receive buffers held only while in use (parallel/pipeline_recv.py), on 2 gloo ranks.

For each schedule, two training steps of the real trainer at pp 2 with 4 microbatches, once
with on-demand buffers (the default) and once with torch's preallocated ones: the losses and
gradient norms are bitwise equal; between steps no on-demand buffer holds memory (torch's hold
one per microbatch); during the step a stage holds at most two of each kind (M = 4 here), and no
received activation outlives its microbatch's backward by more than the schedule's latest
receive op (the last stage's losses and outputs, which the schedule keeps to the step's end,
no longer hold their graphs). The
schedule-by-schedule exactness against one process is in test_pipeline.py, which runs with
on-demand buffers.
"""

from __future__ import annotations

import weakref

import pytest

from tests.dist_harness import run_ranks
from tests.parallel.pp_harness import config

M = 4
# id: (schedule, stages per rank, zero-bubble backward). "deferred" is the default without
# checkpointing; "fused" the one with full checkpointing (and the 32K benchmarks).
CASES = {
    "1F1B": ("1F1B", 1, None),
    "GPipe": ("GPipe", 1, None),
    "ZBV-fused": ("ZBVZeroBubble", 2, "fused"),
    "ZBV-deferred": ("ZBVZeroBubble", 2, "deferred"),
}
# Most buffers of one kind a stage holds at once: the one in use and the next one's posted
# receive. (The activations GPipe keeps for its backwards are the graph's, not the stage's.)
MOST = 2


def _receives(info) -> bool:
    buf = getattr(info, "buffer", None)
    return not getattr(info, "is_root_arg", False) and buf is not None and buf.numel() > 0


def _live(infos_by_mb) -> int:
    """How many of a stage's receive buffers (all microbatches) hold memory."""
    return sum(_receives(info) for infos in infos_by_mb.values() for info in infos)


def _count(stage, peaks: dict) -> None:
    """Wrap the stage's schedule entry points to record its peak live buffers of each kind,
    and how many received activations outlive their microbatch's backward (``lingering``:
    weak references to each received buffer, checked after every action)."""
    key = stage.stage_index
    peaks[key] = {"act": 0, "grad": 0, "lingering": 0}
    received: dict[int, list] = {}  # microbatch -> weak references to its received inputs
    done: set[int] = set()  # microbatches whose backward (and weight pass) is over

    def wrap(name):
        inner = getattr(stage, name)

        def call(*args, **kwargs):
            out = inner(*args, **kwargs)
            mb = args[0] if args else None
            if name == "get_fwd_recv_ops":  # a new step's microbatch mb
                done.discard(mb)
                received[mb] = [
                    weakref.ref(i.buffer) for i in stage.args_recv_info[mb] if _receives(i)
                ]
            if (name == "backward_one_chunk" and kwargs.get("full_backward", True)) or (
                name == "backward_weight_one_chunk"
            ):
                done.add(mb)
            p = peaks[key]
            p["act"] = max(p["act"], _live(stage.args_recv_info))
            p["grad"] = max(p["grad"], _live(getattr(stage, "grad_recv_info", {})))
            alive = sum(r() is not None for m in done for r in received.get(m, ()))
            p["lingering"] = max(p["lingering"], alive)
            return out

        setattr(stage, name, call)

    for name in (
        "get_fwd_recv_ops",
        "get_bwd_recv_ops",
        "forward_one_chunk",
        "backward_one_chunk",
        "backward_weight_one_chunk",
        "set_local_fwd_input",
        "set_local_bwd_input",
    ):
        wrap(name)


def worker(rank: int, world: int, run_dir: str, case: str, mode: str) -> dict:
    import os

    from launch.trainer import Trainer

    del world
    os.environ["LINSCALE_PP_RECV_BUFFERS"] = mode
    schedule, per_rank, zb = CASES[case]
    if zb:
        os.environ["LINSCALE_PP_ZB_BACKWARD"] = zb
    extra = [
        "parallel.pp=2",
        f"parallel.pp_schedule={schedule}",
        f"parallel.pp_stages_per_rank={per_rank}",
        f"parallel.pp_microbatches={M}",
        "training.steps=2",
        "training.batch_size=4",
    ]
    trainer = Trainer(config(run_dir, f"{mode}{rank}", extra))
    peaks: dict = {}
    for stage in trainer.pipeline.stages:
        _count(stage, peaks)
    hist = trainer.train()
    after = {
        s.stage_index: (_live(s.args_recv_info), _live(getattr(s, "grad_recv_info", {})))
        for s in trainer.pipeline.stages
    }
    stages = {s.stage_index: (s.is_first, s.is_last) for s in trainer.pipeline.stages}
    return {
        "losses": [h.loss for h in hist],
        "norms": [h.grad_norm for h in hist],
        "peaks": peaks,
        "after": after,
        "stages": stages,
    }


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", list(CASES))
def test_receive_buffers_on_demand(case, tmp_path):
    lazy = run_ranks(worker, 2, str(tmp_path / "lazy"), case, "on_demand")
    full = run_ranks(worker, 2, str(tmp_path / "full"), case, "preallocated")
    for r in range(2):
        assert lazy[r]["losses"] == full[r]["losses"], (r, lazy[r]["losses"], full[r]["losses"])
        assert lazy[r]["norms"] == full[r]["norms"]
        for s, (first, last) in lazy[r]["stages"].items():
            assert lazy[r]["after"][s] == (0, 0), (s, lazy[r]["after"][s])
            # torch keeps one buffer per microbatch and input / output it receives for
            want = (0 if first else M, 0 if last else M)
            assert full[r]["after"][s] == want, (s, full[r]["after"][s])
            peak = lazy[r]["peaks"][s]
            if not first:
                assert 1 <= peak["act"] <= MOST, (s, peak)
                # The schedule keeps each loss and output to the step's end, not the graph
                # under them (nor does the deferred weight pass); only its latest receive op
                # may still hold the last one.
                assert peak["lingering"] <= 1, (s, peak)
            if not last:
                assert 1 <= peak["grad"] <= MOST, (s, peak)


def test_setting_rejects_unknown_values(monkeypatch):
    from parallel.pipeline_recv import recv_buffers_on_demand

    monkeypatch.setenv("LINSCALE_PP_RECV_BUFFERS", "lazy")
    with pytest.raises(ValueError, match="LINSCALE_PP_RECV_BUFFERS"):
        recv_buffers_on_demand()
    monkeypatch.setenv("LINSCALE_PP_RECV_BUFFERS", "preallocated")
    assert not recv_buffers_on_demand()
    monkeypatch.delenv("LINSCALE_PP_RECV_BUFFERS")
    assert recv_buffers_on_demand()
