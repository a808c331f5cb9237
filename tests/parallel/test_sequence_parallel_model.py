"""The whole model under sequence parallelism (gloo, sp = 2 and 4, both layouts).

- one forward/backward: loss and every parameter gradient equal the single-device model;
- the trainer with ``parallel.sp = W`` for 10 steps gives the losses of ``parallel.sp = 1``
  (pure linear, an ``LLLN`` hybrid, and a Gated DeltaNet hybrid with its short convolutions).
"""

from __future__ import annotations

import pytest
import torch
from sp_harness import check_case, suite_results
from sp_worker import MODEL_RUNS, case_names, model_overrides, train_losses

WORLDS = (2, 4)
GRAD_CASES = [c for c in case_names("model", 2) if c.startswith("model-grads")]
_REF: dict[str, list[float]] = {}


def reference_losses(run: str, tmp_path_factory) -> list[float]:
    if run not in _REF:
        tmp = tmp_path_factory.mktemp(f"ref-{run}")
        _REF[run] = train_losses(model_overrides(run, 1, "contiguous", str(tmp)))
    return _REF[run]


@pytest.mark.timeout(400)
@pytest.mark.parametrize("case", GRAD_CASES)
@pytest.mark.parametrize("world", WORLDS)
def test_model_gradients(world: int, case: str) -> None:
    check_case("model", world, case)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("layout", ("contiguous", "zigzag"))
@pytest.mark.parametrize("run", list(MODEL_RUNS))
@pytest.mark.parametrize("world", WORLDS)
def test_training_losses_match_sp1(world: int, run: str, layout: str, tmp_path_factory) -> None:
    case = f"model-{run}-{layout}"
    check_case("model", world, case)
    losses = suite_results("model", world)[case]["data"]["losses"]
    ref = reference_losses(run, tmp_path_factory)
    assert len(losses) == len(ref) == 10
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), rtol=1e-4, atol=1e-5)


def test_apply_and_remove_hooks_single_rank() -> None:
    """Without a process group the swapped hooks compute the same model; removal restores them."""
    from models.llama import LinearLlama, ModelArgs
    from parallel.sequence_parallel import apply_sequence_parallel, remove_sequence_parallel

    args = ModelArgs(
        dim=32,
        n_layers=4,
        n_heads=2,
        ffn_dim=64,
        vocab_size=64,
        layer_pattern="LLLN",
        linear_variant="gated_deltanet",
    )
    torch.manual_seed(0)
    model = LinearLlama(args)
    before = {
        n: (m.attn_op if hasattr(m, "attn_op") else m.conv_op)
        for n, m in model.named_modules()
        if hasattr(m, "attn_op") or hasattr(m, "conv_op")
    }
    tokens = torch.randint(0, 64, (1, 24))
    ref = model(tokens)
    apply_sequence_parallel(model, group=None, layout="zigzag")
    swapped = [n for n, m in model.named_modules() if hasattr(m, "_sp_original_op")]
    assert len(swapped) == len(before) == 4 * 1 + 3 * 3  # 4 attention hooks, 9 convs
    torch.testing.assert_close(model(tokens), ref, rtol=1e-5, atol=1e-6)
    remove_sequence_parallel(model)
    after = {
        n: (m.attn_op if hasattr(m, "attn_op") else m.conv_op)
        for n, m in model.named_modules()
        if n in before
    }
    assert all(after[n] is before[n] for n in before)
    with pytest.raises(ValueError, match="layout"):
        apply_sequence_parallel(model, group=None, layout="diagonal")
