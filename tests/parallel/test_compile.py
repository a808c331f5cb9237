"""training.compile: every block compiled by torch.compile (inductor on CPU here), the Triton /
SP cores left outside the graphs; training matches eager to rounding, alone and composed with
checkpointing, SP, DP and FSDP on 4 gloo ranks."""

from __future__ import annotations

import pytest
import torch

from launch.config import load_config
from launch.trainer import Trainer
from parallel.compile import apply_compile
from tests.parallel.pp_harness import BASE, run_case


@pytest.mark.timeout(300)
def test_compiled_training_matches_eager(tmp_path):
    from torch._dynamo.utils import counters

    runs = {}
    for flag in ("false", "true"):
        tr = Trainer(
            load_config(
                None,
                [
                    *BASE,
                    "training.steps=3",
                    f"training.compile={flag}",
                    "parallel.activation_checkpointing=partial",
                    f"logging.run_dir={tmp_path / flag}",
                ],
            )
        )
        counters.clear()
        hist = tr.train()
        runs[flag] = ([h.loss for h in hist], [h.grad_norm for h in hist])
        model = tr.model_parts[0]
        if flag == "true":
            # graphs were really captured, around the opaque attention op, and names are kept
            assert counters["stats"]["unique_graphs"] >= 2, dict(counters["stats"])
            for block in model.layers.values():
                inner = getattr(block, "_checkpoint_wrapped_module", block)
                assert inner._compiled_call_impl is not None
                assert inner.attention.attn_op._linscale_compile_opaque
            names = {n for n, _ in model.named_parameters()}
            assert any(n.endswith("attention.q_proj.weight") for n in names)
            assert not any("_orig_mod" in n for n in names)
    torch.testing.assert_close(
        torch.tensor(runs["true"][0]), torch.tensor(runs["false"][0]), rtol=1e-5, atol=0
    )
    torch.testing.assert_close(
        torch.tensor(runs["true"][1]), torch.tensor(runs["false"][1]), rtol=1e-4, atol=0
    )


def test_apply_compile_wraps_each_op_once():
    from models.llama import LinearLlama
    from models.presets import get_preset

    model = LinearLlama(get_preset("tiny", dim=32, n_layers=2, n_heads=2, ffn_dim=64))
    assert apply_compile(model) == 2
    first = model.layers["0"].attention.attn_op
    apply_compile(model)  # again: the op is not wrapped twice
    assert model.layers["0"].attention.attn_op is first


@pytest.mark.timeout(300)
def test_compile_with_sp_fsdp_checkpointing_on_four_ranks(tmp_path_factory):
    """dp2 x sp2, FSDP2 over dp_sp, every block checkpointed and compiled (LASP-2 outside the
    graphs): the harness's 5 steps equal single-process training (compiled too: inductor's
    own reduction order is part of the rounding) to rounding."""
    run_case(
        [
            "parallel.dp=2",
            "parallel.sp=2",
            "parallel.fsdp=true",
            "parallel.activation_checkpointing=full",
        ],
        ["training.compile=true"],
        tmp_path_factory,
    )


@pytest.mark.timeout(300)
def test_compile_with_pipeline_on_four_ranks(tmp_path_factory):
    """pp2 x dp2 under 1F1B with compiled, checkpointed stage blocks: the single-process
    compiled run's losses, norms and parameters to rounding."""
    run_case(
        [
            "parallel.pp=2",
            "parallel.dp=2",
            "parallel.pp_microbatches=2",
            "parallel.activation_checkpointing=full",
        ],
        ["training.compile=true"],
        tmp_path_factory,
    )
