"""Zero-bubble schedules do 1F1B's work: the aten matmul FLOPs of one training step per rank
(2 gloo ranks, no checkpointing) are the same multiset for ZBVZeroBubble as for 1F1B, and the
weight pass is torch's per-group one without checkpointing, linscale's merged one with it.
(The merged pass without checkpointing ran 26% more FLOPs: the input path's backward again.)"""

from __future__ import annotations

import collections

import pytest

from tests.dist_harness import run_ranks


def _step_flops(rank, world, schedule, ac):
    import torch
    from torch.distributed.pipelining import stage as stage_module
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_map
    from torch.utils.flop_counter import flop_registry

    from launch.config import load_config
    from launch.trainer import Trainer
    from parallel.pipeline_weight_grad import merged_stage_backward_weight

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.flops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            rule = flop_registry.get(func._overloadpacket)
            if rule is not None:

                def shape(x):
                    return x.shape if isinstance(x, torch.Tensor) else x

                self.flops[str(func._overloadpacket)] += rule(
                    *tree_map(shape, args), **tree_map(shape, kwargs), out_val=tree_map(shape, out)
                )
            return out

    per_rank = 1 if schedule == "1F1B" else 2
    cfg = load_config(
        None,
        [
            "model.dim=64",
            "model.ffn_dim=128",
            "model.n_heads=2",
            "model.n_layers=8",
            "training.seq_len=64",
            "training.batch_size=4",
            "training.steps=2",
            "data.max_files=20",
            "logging.progress=false",
            "checkpoint.enabled=false",
            "parallel.pp=2",
            f"parallel.pp_schedule={schedule}",
            f"parallel.pp_stages_per_rank={per_rank}",
            "parallel.pp_microbatches=4",
            f"parallel.activation_checkpointing={ac}",
            "logging.run_dir=/tmp/linscale_pp_flops",
        ],
    )
    trainer = Trainer(cfg)
    merged = stage_module.stage_backward_weight is merged_stage_backward_weight
    trainer.train_step()
    counter = Count()
    with counter:
        trainer.train_step()
    return sum(counter.flops.values()), merged


@pytest.mark.timeout(240)
def test_zero_bubble_runs_1f1b_flops_without_checkpointing():
    ref = sorted(f for f, _ in run_ranks(_step_flops, 2, "1F1B", "none"))
    zbv = run_ranks(_step_flops, 2, "ZBVZeroBubble", "none")
    assert sorted(f for f, _ in zbv) == ref
    assert not any(m for _, m in zbv), "torch's per-group weight pass without checkpointing"


@pytest.mark.timeout(240)
def test_merged_weight_pass_with_checkpointing():
    assert all(m for _, m in run_ranks(_step_flops, 2, "ZBVZeroBubble", "full"))
