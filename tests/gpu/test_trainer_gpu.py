"""GPU checks of the trainer (run on a CUDA machine: pytest -m gpu tests/gpu)."""

from __future__ import annotations

import pytest
import torch

from launch.config import load_config
from launch.trainer import Trainer
from models.llama import LinearLlama
from models.presets import get_preset

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("variant", ["linear", "simple_gla", "gla", "gated_deltanet"])
def test_bf16_training_lowers_the_loss(tmp_path, variant):
    cfg = load_config(
        None,
        [
            f"model.linear_variant={variant}",
            "training.steps=25",
            "training.seq_len=1024",
            "logging.progress=false",
            f"logging.run_dir={tmp_path}",
            "checkpoint.enabled=false",
        ],
    )
    tr = Trainer(cfg)
    assert tr.autocast_dtype == torch.bfloat16 and tr.device.type == "cuda"
    hist = tr.train()
    assert hist[-1].loss < hist[0].loss - 1.0
    assert all(torch.isfinite(torch.tensor(h.loss)) for h in hist)


@pytest.mark.parametrize("variant", ["linear", "lightning", "retention", "gla", "gated_deltanet"])
def test_triton_model_matches_reference_model(variant):
    """The 1B family (narrowed) with Triton kernels against the pure-torch ops, fp32."""
    torch.manual_seed(0)
    args = get_preset(
        "linear-llama3-1b",
        dim=512,
        n_layers=2,
        n_heads=4,
        n_kv_heads=4,
        ffn_dim=1024,
        vocab_size=1000,
        linear_variant=variant,
        kernel_backend="triton",
    )
    a = LinearLlama(args).cuda()
    ref_args = get_preset("linear-llama3-1b", **{**args.__dict__, "kernel_backend": "reference"})
    b = LinearLlama(ref_args).cuda()
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 1000, (2, 1000), device="cuda")
    la = a.loss(a(x), x) / x.numel()
    lb = b.loss(b(x), x) / x.numel()
    la.backward()
    lb.backward()
    # fp32 inputs, but the kernels use tf32 products: the issue allows 5e-3 relative there.
    torch.testing.assert_close(la, lb, rtol=1e-3, atol=1e-4)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        rel = (p.grad - q.grad).norm() / q.grad.norm().clamp(min=1e-12)
        assert rel < 5e-3, (n, float(rel))


@pytest.mark.parametrize("variant", ["linear", "simple_gla", "gla", "gated_deltanet"])
def test_compiled_bf16_training_matches_eager(tmp_path, variant):
    """training.compile on the GPU (inductor around the Triton ops), every block checkpointed:
    6 bf16 steps of the tiny model give eager's losses to bf16 rounding."""
    losses = {}
    for flag in ("false", "true"):
        cfg = load_config(
            None,
            [
                f"model.linear_variant={variant}",
                "training.steps=6",
                "training.seq_len=1024",
                "training.lr=3e-4",
                f"training.compile={flag}",
                "parallel.activation_checkpointing=full",
                "logging.progress=false",
                f"logging.run_dir={tmp_path / flag}",
                "checkpoint.enabled=false",
            ],
        )
        losses[flag] = [h.loss for h in Trainer(cfg).train()]
    torch.testing.assert_close(
        torch.tensor(losses["true"]), torch.tensor(losses["false"]), rtol=5e-3, atol=0
    )
