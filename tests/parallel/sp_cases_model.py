"""Model-level SP cases for ``sp_worker.py``: whole-model gradients and trainer losses."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.distributed as dist
from sp_harness import rel_err

from parallel.sequence_shard import shard_position_ids, shard_sequence

LAYOUTS = ("contiguous", "zigzag")


MODEL_RUNS = {  # name: overrides
    "linear-L": ["model.layer_pattern=L", "model.linear_variant=linear"],
    "hybrid-LLLN": ["model.layer_pattern=LLLN", "model.linear_variant=linear"],
    "gdn-LLLN": ["model.layer_pattern=LLLN", "model.linear_variant=gated_deltanet"],
    # Recomputation in the backward issues the SP collectives again, in the same order.
    "gla-LLLN-ckpt": [
        "model.layer_pattern=LLLN",
        "model.linear_variant=gla",
        "parallel.activation_checkpointing=full",
    ],
}
MODEL_COMMON = [
    "model.preset=tiny",
    "model.dim=32",
    "model.ffn_dim=64",
    "model.n_heads=2",
    "model.n_kv_heads=1",
    "model.n_layers=4",
    "training.seq_len=64",
    "training.batch_size=2",
    "training.steps=10",
    "training.warmup_steps=3",
    "training.lr=1e-3",
    "training.dtype=fp32",
    "training.device=cpu",
    "data.max_files=20",
    "checkpoint.enabled=false",
    "logging.progress=false",
]


def model_overrides(run: str, sp: int, layout: str, run_dir: str) -> list[str]:
    extra = os.environ.get("LINSCALE_SP_TEST_OVERRIDES", "").split()
    return [
        *MODEL_COMMON,
        *MODEL_RUNS[run],
        f"parallel.sp={sp}",
        f"parallel.layout={layout}",
        f"logging.run_dir={run_dir}",
        f"logging.name={run}-{sp}-{layout}",
        *extra,
    ]


def train_losses(overrides: list[str]) -> list[float]:
    from launch.config import load_config
    from launch.trainer import Trainer

    return [h.loss for h in Trainer(load_config(None, overrides)).train()]


def model_case(run: str, layout: str):
    def run_fn(rank, world, group):
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            return {"losses": train_losses(model_overrides(run, world, layout, tmp))}

    return run_fn


def model_grad_case(pattern: str, variant: str, layout: str):
    """One forward/backward of the whole model: loss and every parameter gradient vs the
    single-device model (fp64, so any error above rounding is a bug, not optimizer noise)."""

    def run(rank, world, group):
        from models.llama import LinearLlama, ModelArgs
        from parallel.sequence_parallel import apply_sequence_parallel

        args = ModelArgs(
            dim=32,
            n_layers=4,
            n_heads=2,
            n_kv_heads=1,
            ffn_dim=64,
            vocab_size=64,
            layer_pattern=pattern,
            linear_variant=variant,
            kernel_backend="reference",
        )
        torch.manual_seed(0)
        model = LinearLlama(args).double()
        gen = torch.Generator().manual_seed(1)
        T = 16 * world
        tokens = torch.randint(0, 64, (2, T), generator=gen)
        labels = torch.randint(0, 64, (2, T), generator=gen)
        loss_ref = model.loss(model(tokens), labels) / labels.numel()
        grads_ref = torch.autograd.grad(loss_ref, list(model.parameters()))
        apply_sequence_parallel(model, group=group, layout=layout)
        kw = {"rank": rank, "world": world, "layout": layout}
        pos = shard_position_ids(T, **kw)
        loss = (
            model.loss(
                model(shard_sequence(tokens, dim=1, **kw), position_ids=pos),
                shard_sequence(labels, dim=1, **kw),
            )
            / labels.numel()
        )
        grads = torch.autograd.grad(loss, list(model.parameters()))
        total = loss.detach().clone()
        dist.all_reduce(total, group=group)
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        ref_flat = torch.cat([g.reshape(-1) for g in grads_ref])
        per_param = [
            rel_err(a.view_as(b), b)
            for a, b in zip(flat.split([g.numel() for g in grads]), grads_ref)
            if b.abs().max() > 0
        ]
        return max(rel_err(total, loss_ref), rel_err(flat, ref_flat), *per_param)

    return run


def model_cases(world: int) -> dict[str, tuple[Callable, float]]:
    cases = {
        f"model-grads-{pattern}-{variant}-{layout}":
        # The model casts gates to fp32 whatever the input dtype: fp32 rounding there.
        (model_grad_case(pattern, variant, layout), 1e-9 if variant == "linear" else 1e-5)
        for pattern, variant in (
            ("L", "linear"),
            ("LLLN", "gated_deltanet"),
            ("LLLN", "gla"),
            ("LLLN", "simple_gla"),
        )
        for layout in LAYOUTS
    }
    cases.update(
        {
            f"model-{run}-{layout}": (model_case(run, layout), 0.0)
            for run in MODEL_RUNS
            for layout in LAYOUTS
        }
    )
    return cases
