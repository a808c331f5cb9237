"""LASP-2's "serial" schedule (AllGather first, then one op call from the incoming state) is
exact: forward and every gradient against the fp64 naive recurrence, both layouts, W = 2, 3."""

from __future__ import annotations

import pytest
import torch

from tests.dist_harness import run_ranks
from tests.parallel.lasp2_cases import lasp2_inputs, naive_reference, serial_rank_run


def _inputs(family: str, T: int):
    return lasp2_inputs(family, T, seed=7, K=8, V=6, dtype=torch.float64)


def _worker(rank, world, family, layout, T):
    return serial_rank_run(rank, world, family, layout, *_inputs(family, T))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("family", ["linear", "scalar", "gla"])
def test_serial_schedule_is_exact(world, layout, family):
    from parallel.sequence_shard import shard_sequence

    T = 2 * world * 35  # 35 tokens per slice: ragged against the 64-token chunk
    q, k, v, gates = _inputs(family, T)
    o_ref, grads_ref = naive_reference(family, q, k, v, gates)
    for rank, (o, grads) in enumerate(run_ranks(_worker, world, family, layout, T)):
        kw = {"dim": 1, "rank": rank, "world": world, "layout": layout}
        torch.testing.assert_close(o, shard_sequence(o_ref, **kw), rtol=1e-9, atol=1e-9)
        for g, g_ref in zip(grads, grads_ref):
            torch.testing.assert_close(g, shard_sequence(g_ref, **kw), rtol=1e-9, atol=1e-9)


def test_bad_schedule_is_refused():
    from parallel.lasp2 import lasp2_linear_attn

    q = torch.zeros(1, 4, 1, 2)
    with pytest.raises(ValueError, match="schedule"):
        lasp2_linear_attn(q, q, q, group=None, schedule="eager")


FAST = [
    "model.dim=64",
    "model.ffn_dim=128",
    "model.n_heads=2",
    "model.layer_pattern=LLN",
    "model.linear_variant=simple_gla",
    "training.seq_len=64",
    "training.batch_size=2",
    "data.max_files=20",
    "logging.progress=false",
    "checkpoint.enabled=false",
    "training.steps=3",
]


def _train_worker(rank, world, run_dir):
    from launch.config import load_config
    from launch.trainer import Trainer

    cfg = load_config(
        None,
        [
            *FAST,
            "parallel.sp=2",
            "parallel.layout=zigzag",
            "parallel.lasp2_schedule=overlap",
            f"logging.run_dir={run_dir}",
        ],
    )
    return [h.loss for h in Trainer(cfg).train()]


@pytest.mark.timeout(240)
def test_trainer_with_overlap_schedule_matches_one_process(tmp_path):
    """The default (serial) runs in the other SP trainer tests; this one sets overlap."""
    from launch.config import load_config
    from launch.trainer import Trainer

    ref = [
        h.loss
        for h in Trainer(
            load_config(None, [*FAST, f"logging.run_dir={tmp_path}", "logging.name=one"])
        ).train()
    ]
    for losses in run_ranks(_train_worker, 2, str(tmp_path)):
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), rtol=1e-5, atol=1e-6)
