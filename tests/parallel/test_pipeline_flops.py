"""Zero-bubble schedules do 1F1B's work: the aten matmul FLOPs of one training step per rank
(2 gloo ranks) are the same multiset for ZBVZeroBubble as for 1F1B, without checkpointing and
with full checkpointing, for the deferred weight pass (parallel/deferred_wgrad.py; the default
without checkpointing), torch's split backward and the fused backward (the default with it). The
merged weight pass ran 26% more without checkpointing (the input path's backward again) and
more with it (a third forward per block and microbatch); the deferred pass, before its last
linear layer per checkpointed block kept its own backward, ran 5% more with checkpointing (the
recompute's early stop no longer skipped that layer's product)."""

from __future__ import annotations

import collections

import pytest

from tests.dist_harness import run_ranks


def _step_flops(rank, world, schedule, ac, zb_backward="auto"):
    import os

    import torch
    from torch.distributed.pipelining import stage as stage_module
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_map
    from torch.utils.flop_counter import flop_registry

    from launch.config import load_config
    from launch.trainer import Trainer
    from parallel.pipeline_weight_grad import fused_stage_backward_input

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

    os.environ["LINSCALE_PP_ZB_BACKWARD"] = zb_backward
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
    fused = stage_module.stage_backward_input is fused_stage_backward_input
    deferred = bool(trainer.pipeline._wgrad_stores)
    trainer.train_step()
    counter = Count()
    with counter:
        trainer.train_step()
    return sum(counter.flops.values()), fused, deferred


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "ac,modes",
    [("none", ("auto", "split")), ("full", ("auto", "deferred"))],
)
def test_zero_bubble_runs_1f1b_flops(ac, modes):
    """Without checkpointing the default deferred weight pass and torch's split backward (the
    FSDP fallback); with it the default fused backward (one recompute per block and
    microbatch, as 1F1B) and the deferred pass."""
    ref = sorted(f for f, *_ in run_ranks(_step_flops, 2, "1F1B", ac))
    for mode in modes:
        zbv = run_ranks(_step_flops, 2, "ZBVZeroBubble", ac, mode)
        assert sorted(f for f, *_ in zbv) == ref, mode
        want_deferred = mode == "deferred" or (mode == "auto" and ac == "none")
        want_fused = mode == "auto" and ac == "full"
        assert all(d == want_deferred and f == want_fused for _, f, d in zbv), mode
