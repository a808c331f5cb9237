"""Deferred weight gradients for the zero-bubble pipeline schedules.

A zero-bubble schedule splits each stage's backward into B (the input gradients, on the critical
path to the previous stage) and W (the weight gradients, moved into bubbles). torch's own split
keeps the stage's whole autograd graph, every saved activation included, from B to W, and with
activation checkpointing replays each block once per parameter group
(:mod:`parallel.pipeline_weight_grad`). Here B is an ordinary full backward that frees the
graph, except that every ``nn.Linear`` of the stage's blocks (where nearly all weight-gradient
FLOPs are) computes only ``dx = dy W`` and leaves ``(x, dy)`` in a :class:`WeightGradStore`;
W computes ``dW = dy^T x`` for what that B left and adds it to ``weight.grad``. So each block
runs forward (plus one recompute under checkpointing) as in 1F1B, W needs no recompute, and
between B and W a microbatch holds only the linear layers' inputs and output gradients.

Applied from outside (:func:`defer_linear_weight_grads` rebinds the layers' ``forward``); the
stage hands :meth:`WeightGradStore.builder` to ``PipelineStage(dw_builder=...)``, which calls it
after each B and runs the returned closure in that microbatch's W slot (at once for a full
backward), and :meth:`WeightGradStore.arm` limits the deferral to those backward actions. Not
for FSDP-sharded parameters (their gradients are reduced in the backward's hooks, before W) nor
compiled blocks.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

__all__ = ["WeightGradStore", "defer_linear_weight_grads"]


class WeightGradStore:
    """The ``(x, dy, weight)`` triples that B left, until the matching W takes them.

    Deferral is on only while ``armed`` (during the stage's own backward actions, see
    :meth:`arm`): any other backward through the layers (torch's shape inference runs one on
    the first step) gets ordinary weight gradients. With ``max_waiting`` at most that many
    backwards' weight gradients wait at once; a later backward applies its own right away
    (``parallel.pp_zb_max_pending_w``: a memory bound).
    """

    def __init__(self, max_waiting: int | None = None) -> None:
        self.pending: list[tuple[torch.Tensor, torch.Tensor, nn.Parameter]] = []
        self.armed = False
        # At most max_waiting built closures not yet run (None: no bound); beyond, W runs in B.
        self.max_waiting = max_waiting
        self.waiting = 0
        # The last input cast to the compute dtype, (input, its version, cast) as weak
        # references: q/k/v and the MLP's gate/up read one input and share one saved cast.
        self._last_cast: tuple | None = None

    def cast(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``x.to(dtype)``, the same tensor for consecutive calls on the same unchanged x."""
        if x.dtype == dtype:
            return x
        if self._last_cast is not None:
            ref, version, cast_ref = self._last_cast
            cast = cast_ref()
            if ref() is x and version == x._version and cast is not None and cast.dtype == dtype:
                return cast
        cast = x.to(dtype)
        self._last_cast = (weakref.ref(x), x._version, weakref.ref(cast))
        return cast

    def arm(self, stage) -> None:
        """Defer during ``stage.backward_one_chunk`` (a ``PipelineStage``), and only then."""
        inner = stage.backward_one_chunk

        def backward_one_chunk(*args, **kwargs):
            self.armed = True
            try:
                return inner(*args, **kwargs)
            finally:
                self.armed = False

        stage.backward_one_chunk = backward_one_chunk

    def builder(self) -> Callable[[], None]:
        """Takes what the last backward left; the returned closure adds the weight gradients."""
        items, self.pending = self.pending, []

        def apply() -> None:
            for x, dy, weight in items:
                dw = _weight_grad(x, dy, weight)
                if weight.grad is None:
                    weight.grad = dw
                else:
                    weight.grad.add_(dw)
            items.clear()

        if self.max_waiting is not None and self.waiting >= self.max_waiting:
            apply()  # the bound is reached: this backward's weight gradients now
            return lambda: None
        self.waiting += 1

        def run() -> None:
            self.waiting -= 1
            apply()

        return run


def _weight_grad(x: torch.Tensor, dy: torch.Tensor, weight: nn.Parameter) -> torch.Tensor:
    """``dy^T x`` over all leading dims, ``[out, in]`` in the weight's dtype."""
    return dy.reshape(-1, dy.shape[-1]).t().mm(x.reshape(-1, x.shape[-1])).to(weight.dtype)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


class _DeferredLinear(torch.autograd.Function):
    """``y = x W^T`` (no bias) whose backward returns only ``dx`` and stores ``(x, dy, W)``.

    Mirrors autocast's linear: x and W cast to the autocast dtype, the product in it, ``dx``
    returned in x's dtype and ``dW`` (in the compute dtype, as autocast's GEMM gives it) added
    to the fp32 master gradient. Layers reading the same input share its saved cast (autocast
    casts and saves it once per layer), which also shrinks what waits for W.
    """

    @staticmethod
    def forward(ctx, x, weight, store):
        xc = store.cast(x, _compute_dtype(x))
        dtype = xc.dtype
        with torch.autocast(x.device.type, enabled=False):
            y = F.linear(xc, weight.to(dtype))
        ctx.save_for_backward(xc)
        # The parameter itself, not a saved tensor: under activation checkpointing a saved
        # tensor unpacks as a detached alias, whose .grad is not the parameter's.
        ctx.weight, ctx.store, ctx.x_dtype = weight, store, x.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        (xc,) = ctx.saved_tensors
        weight = ctx.weight
        dx = dy.matmul(weight.to(dy.dtype)).to(ctx.x_dtype)
        if ctx.store.armed:
            # Detached: an unpacked saved input carries its producer's grad_fn, and through it
            # the graph down to the stage input (a received activation) would wait for W too.
            ctx.store.pending.append((xc.detach(), dy, weight))
            return dx, None, None
        return dx, _weight_grad(xc, dy, weight), None


def _deferred_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _DeferredLinear.apply(x, self.weight, self._wgrad_store)


def defer_linear_weight_grads(
    module: nn.Module, *, max_waiting: int | None = None
) -> WeightGradStore:
    """Make the bias-free ``nn.Linear`` layers of each block in ``module.layers`` defer their
    weight gradients to one new store (returned); layers with a bias keep their backward.

    In an activation-checkpointed block the last linear layer (registration order, which is
    execution order for the blocks here: the MLP's down projection) keeps its ordinary
    backward: the recompute stops as soon as the last saved tensor is packed, and a built-in
    matmul packs its inputs before it runs, so torch's early stop skips that layer's matmul in
    the recompute; an autograd Function packs after its forward and would cost the product
    again (``tests/parallel/test_pipeline_flops.py`` counts it). ``max_waiting``: see
    :class:`WeightGradStore`.
    """
    store = WeightGradStore(max_waiting)
    for block in module.layers.values():
        linears = [
            sub
            for sub in block.modules()
            if isinstance(sub, nn.Linear) and sub.bias is None and sub.weight.requires_grad
        ]
        if isinstance(block, CheckpointWrapper) and linears:
            linears = linears[:-1]
        for sub in linears:
            sub._wgrad_store = store
            sub.forward = types.MethodType(_deferred_forward, sub)
    return store
