"""Deferred weight gradients (parallel/deferred_wgrad.py) in one process: the same gradients as
an ordinary backward once the weight pass has run, none before it, ordinary ones when not armed,
and no extra matmul FLOPs under activation checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from models.llama import LinearLlama
from models.presets import get_preset
from parallel.checkpointing import apply_activation_checkpointing
from parallel.deferred_wgrad import defer_linear_weight_grads


def _model(ckpt: str) -> LinearLlama:
    torch.manual_seed(0)
    model = LinearLlama(get_preset("tiny", dim=32, ffn_dim=64, n_heads=2, layer_pattern="LN"))
    apply_activation_checkpointing(model, mode=ckpt, every=2)
    return model


def _loss(model, tokens, labels, autocast: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return model.loss(model(tokens), labels) / labels.numel()


def _grads(model) -> dict[str, torch.Tensor | None]:
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("ckpt", ["none", "full", "partial"])
@pytest.mark.parametrize("autocast", [False, True])
def test_weight_pass_gives_the_ordinary_gradients(ckpt, autocast):
    ref = _model(ckpt)
    model = copy.deepcopy(ref)
    store = defer_linear_weight_grads(model)
    tokens, labels = torch.randint(0, 256, (2, 24)), torch.randint(0, 256, (2, 24))
    for _ in range(2):  # two microbatches accumulate
        _loss(ref, tokens, labels, autocast).backward()
        store.armed = True
        _loss(model, tokens, labels, autocast).backward()
        store.armed = False
        deferred = [w for _, _, w in store.pending]
        assert deferred, "nothing was deferred"
        run = store.builder()
        assert not store.pending
        run()
    assert deferred[0].grad is not None
    tol = {"rtol": 2e-2, "atol": 1e-5} if autocast else {"rtol": 1e-5, "atol": 1e-7}
    got, want = _grads(model), _grads(ref)
    assert got.keys() == want.keys()
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, **tol, msg=name)


def test_weight_gradients_wait_for_the_weight_pass_when_armed():
    model = _model("none")
    store = defer_linear_weight_grads(model)
    q = model.layers["0"].attention.q_proj.weight
    tokens, labels = torch.randint(0, 256, (1, 16)), torch.randint(0, 256, (1, 16))
    store.armed = True
    _loss(model, tokens, labels, False).backward()
    assert q.grad is None and model.layers["0"].attention_norm.weight.grad is not None
    store.builder()()
    assert q.grad is not None and q.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    store.armed = False  # e.g. torch's shape inference: ordinary gradients, nothing pending
    _loss(model, tokens, labels, False).backward()
    assert q.grad is not None and not store.pending


def test_checkpointed_blocks_keep_their_last_linear_and_their_flops():
    """In a checkpointed block the down projection keeps its own backward, so the recompute
    stops before its product (torch's early stop) as without deferral: equal matmul FLOPs."""
    flops = []
    for defer in (False, True):
        model = _model("full")
        store = defer_linear_weight_grads(model) if defer else None
        if store is not None:
            assert not hasattr(model.layers["0"].feed_forward.w2, "_wgrad_store")
            assert hasattr(model.layers["0"].feed_forward.w1, "_wgrad_store")
            store.armed = True
        tokens, labels = torch.randint(0, 256, (1, 64)), torch.randint(0, 256, (1, 64))
        with FlopCounterMode(display=False) as counter:
            _loss(model, tokens, labels, False).backward()
            if store is not None:
                store.builder()()
        flops.append(counter.get_total_flops())
    assert flops[0] == flops[1]


def test_layers_reading_one_input_share_its_saved_cast():
    """Under bf16 autocast q, k and v (and the MLP's gate and up) keep one bf16 copy of their
    common fp32 input for W (one storage), where autocast's linear saves one per layer."""
    model = _model("none")
    store = defer_linear_weight_grads(model)
    attention = model.layers["0"].attention
    tokens, labels = torch.randint(0, 256, (1, 16)), torch.randint(0, 256, (1, 16))
    store.armed = True
    _loss(model, tokens, labels, True).backward()
    saved = {id(w): x for x, _, w in store.pending}
    q, k, v = (saved[id(m.weight)] for m in (attention.q_proj, attention.k_proj, attention.v_proj))
    assert q.dtype == torch.bfloat16 and q.data_ptr() == k.data_ptr() == v.data_ptr()
    mlp = model.layers["0"].feed_forward
    assert saved[id(mlp.w1.weight)].data_ptr() == saved[id(mlp.w3.weight)].data_ptr()
    assert saved[id(attention.o_proj.weight)].data_ptr() != q.data_ptr()
    # what waits for W is cut from the graph (which would hold the stage's input)
    assert all(x.grad_fn is None for x, _, _ in store.pending)


@pytest.mark.parametrize("bound", [0, 1])
def test_bounded_waiting_applies_the_excess_at_once(bound):
    """With max_waiting, backwards beyond the bound apply their weight gradients in B; the
    total after every W has run is the same."""
    ref = _model("none")
    model = copy.deepcopy(ref)
    store = defer_linear_weight_grads(model, max_waiting=bound)
    q = model.layers["0"].attention.q_proj.weight
    tokens, labels = torch.randint(0, 256, (1, 16)), torch.randint(0, 256, (1, 16))
    runs = []
    for i in range(3):
        _loss(ref, tokens, labels, False).backward()
        store.armed = True
        _loss(model, tokens, labels, False).backward()
        store.armed = False
        runs.append(store.builder())
        assert store.waiting == min(i + 1, bound)
        assert (q.grad is None) == (i < bound), i  # the excess is applied in B
    for run in runs:
        run()
    assert store.waiting == 0
    torch.testing.assert_close(q.grad, ref.layers["0"].attention.q_proj.weight.grad)
