"""Model shapes, forward/backward for each preset family and variant, the chunked loss."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from models.layers import LINEAR_VARIANTS
from models.llama import LinearLlama
from models.loss import chunked_cross_entropy
from models.presets import PRESETS, get_preset


def small(preset: str, **kw):
    """The preset's family (tying, GQA, pattern) at a CPU-sized width."""
    base = PRESETS[preset]
    kv = None if base.n_kv_heads is None else max(1, 4 * base.n_kv_heads // base.n_heads)
    return replace(
        base, dim=64, n_layers=4, n_heads=4, n_kv_heads=kv, ffn_dim=128, vocab_size=97, **kw
    )


def test_preset_sizes():
    assert abs(get_preset("linear-llama3-1b").num_params() - 1.34e9) < 0.01e9
    assert get_preset("linear-llama3-8b").num_params() > 8e9
    assert get_preset("tiny").num_params() < 2e6


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("pattern", ["L", "LLLN"])
def test_forward_backward_each_family(preset, pattern):
    torch.manual_seed(0)
    args = small(preset, layer_pattern=pattern)
    model = LinearLlama(args)
    tokens = torch.randint(0, args.vocab_size, (2, 37))
    h = model(tokens)
    assert h.shape == (2, 37, args.dim)
    loss = model.loss(h, tokens) / tokens.numel()
    loss.backward()
    assert torch.isfinite(loss)
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert (model.output is None) == args.tie_embeddings


@pytest.mark.parametrize("variant", LINEAR_VARIANTS)
def test_each_linear_variant_is_causal(variant):
    """Changing a later token must not change earlier outputs (and must change later ones)."""
    torch.manual_seed(1)
    args = small("tiny", linear_variant=variant, layer_pattern="LLN")
    model = LinearLlama(args).double()
    a = torch.randint(0, args.vocab_size, (1, 70))
    b = a.clone()
    b[0, 50] = (a[0, 50] + 1) % args.vocab_size
    ha, hb = model(a), model(b)
    torch.testing.assert_close(ha[:, :50], hb[:, :50], rtol=1e-10, atol=1e-10)
    assert (ha[:, 50:] - hb[:, 50:]).abs().max() > 1e-6


def test_position_ids_drive_rope():
    torch.manual_seed(2)
    model = LinearLlama(small("tiny", layer_pattern="N")).double()
    x = torch.randint(0, 97, (1, 16))
    h0 = model(x)
    h1 = model(x, position_ids=torch.arange(16))
    torch.testing.assert_close(h0, h1)
    # RoPE is relative: a uniform shift changes nothing, a stretch changes everything.
    torch.testing.assert_close(model(x, position_ids=torch.arange(16) + 5), h0)
    assert (model(x, position_ids=torch.arange(16) * 2) - h0).abs().max() > 1e-6


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_cross_entropy_matches_torch(chunk):
    torch.manual_seed(3)
    N, D, V = 50, 16, 31
    h = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, V, (N,))
    y[::7] = -100
    ref = F.cross_entropy(h @ w.t(), y, ignore_index=-100, reduction="sum")
    got = chunked_cross_entropy(h, w, y, chunk_tokens=chunk)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref)
    (gh_ref, gw_ref) = torch.autograd.grad(ref * 0.5, (h, w))
    (gh, gw) = torch.autograd.grad(got * 0.5, (h, w))
    torch.testing.assert_close(gh, gh_ref)
    torch.testing.assert_close(gw, gw_ref)


def test_chunked_loss_mixed_dtype_weight_gets_fp32_grad():
    """bf16 activations with an fp32 master weight (autocast): the weight's gradient arrives
    in fp32 and, like the loss and the activations' gradient, agrees with an fp64 loss on the
    bf16-rounded weight to bf16 rounding."""
    torch.manual_seed(3)
    h = torch.randn(8, 4, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(11, 4, requires_grad=True)
    y = torch.randint(0, 11, (8,))
    y[2] = -100
    loss = chunked_cross_entropy(h, w, y, chunk_tokens=3)
    loss.backward()
    assert w.grad.dtype == torch.float32 and h.grad.dtype == torch.bfloat16
    h64 = h.detach().double().requires_grad_()
    w64 = w.detach().bfloat16().double().requires_grad_()
    ref = torch.nn.functional.cross_entropy(h64 @ w64.T, y, reduction="sum")
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-2, atol=0)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=2e-2, atol=2e-2)


def test_bad_model_args():
    with pytest.raises(ValueError, match="model.layer_pattern"):
        LinearLlama(small("tiny", layer_pattern="LQ"))
    with pytest.raises(ValueError, match="model.dim"):
        LinearLlama(replace(small("tiny"), n_heads=5))


@pytest.mark.parametrize(
    "mode, every, wrapped", [("full", 1, 4), ("partial", 2, 2), ("partial", 4, 1), ("none", 1, 0)]
)
def test_activation_checkpointing_keeps_gradients(mode, every, wrapped):
    from parallel.checkpointing import apply_activation_checkpointing

    torch.manual_seed(4)
    args = small("tiny", layer_pattern="LLLN")
    ref = LinearLlama(args).double()
    ac = LinearLlama(args).double()
    ac.load_state_dict(ref.state_dict())
    assert apply_activation_checkpointing(ac, mode=mode, every=every) == wrapped
    assert set(ac.state_dict()) == set(ref.state_dict())  # names survive the wrapper
    x = torch.randint(0, args.vocab_size, (2, 33))
    for m in (ref, ac):
        m.loss(m(x), x).backward()
    for (n, p), q in zip(ref.named_parameters(), ac.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=n)
