"""One weight-gradient pass per microbatch for the zero-bubble schedules.

The zero-bubble schedules split a stage's backward into an input-gradient pass and a deferred
weight-gradient pass. torch.distributed.pipelining's weight pass (``stage_backward_weight``)
runs one ``torch.autograd.grad`` per parameter group, and each call unpacks the saved tensors of
an activation-checkpointed block again, so the block is recomputed once per group - about ten
times per block and microbatch for a LinearLlama block (``benchmarks/pipeline_recompute.py``).

:func:`merged_stage_backward_weight` computes the same gradients with ONE ``autograd.grad``
over every group's intermediates. Exactness: each intermediate's incoming gradient is clamped by
a pre-hook to the gradient saved in the input pass (as torch does within a group), and the
groups partition the parameters at those intermediates, so a path from one group's intermediate
into another group's parameters passes through a clamped intermediate and adds nothing twice.
The price: the engine still runs the nodes along those paths (the input-gradient backward
again), so the pipeline installs this pass only for checkpointed blocks and keeps torch's
per-group pass otherwise (:func:`install_merged_weight_pass`).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch.autograd.graph import GradientEdge

__all__ = ["install_merged_weight_pass", "merged_stage_backward_weight"]


def _grad_acc(weight: torch.Tensor):
    """The AccumulateGrad node of a leaf parameter (what param groups list as "params")."""
    return weight.view_as(weight).grad_fn.next_functions[0][0]


def merged_stage_backward_weight(
    weights, param_groups: list[dict[str, Any]], retain_graph: bool = False
) -> tuple[torch.Tensor | None, ...]:
    """Drop-in for ``torch.distributed.pipelining._backward.stage_backward_weight``."""
    acc_to_weight = {}
    weight_grads: list[torch.Tensor | None] = []
    for index, weight in enumerate(weights):
        acc_to_weight[_grad_acc(weight)] = (weight, index)
        weight_grads.append(weight.grad)

    edges, grad_outputs, params, handles = [], [], [], []
    try:
        for group in param_groups:
            for grads, intermediate in zip(group["grads"], group["intermediates"], strict=True):
                for i, grad in enumerate(grads):
                    if grad is not None:
                        edges.append(GradientEdge(intermediate, i))
                        grad_outputs.append(grad)
                handles.append(intermediate.register_prehook(lambda _g, saved=grads: saved))
            params.extend(group["params"])
            del group["intermediates"]  # break the hook -> group -> intermediates cycle
        if edges and params:
            dweights = torch.autograd.grad(
                edges,
                tuple(GradientEdge(p, 0) for p in params),
                grad_outputs=grad_outputs,
                retain_graph=retain_graph,
                allow_unused=True,
            )
            for acc, dw in zip(params, dweights):
                if dw is None:
                    continue
                weight, _ = acc_to_weight[acc]
                if weight.grad is None:
                    weight.grad = dw
                else:
                    weight.grad += dw
        for group in param_groups:
            group.pop("grads", None)
    finally:
        for handle in handles:
            handle.remove()
    return tuple(weight_grads)


_TORCH_PASS: list = []  # torch's own stage_backward_weight, kept to restore it


def install_merged_weight_pass(enable: bool = True) -> bool:
    """Route pipelining's weight pass through :func:`merged_stage_backward_weight` (``enable``)
    or back through torch's own per-group pass (``enable=False``).

    The merged pass is for checkpointed blocks only. Its single ``autograd.grad`` starts at
    every group's intermediate at once, so the engine also runs the nodes between one group's
    intermediate and the next along the input path (their results are then replaced by the
    clamps): in effect the input-gradient backward again. Without checkpointing torch's pass
    costs nothing extra (the same aten FLOPs as 1F1B per step; 26% more with the merged pass,
    ``tests/parallel/test_pipeline_flops.py``); with checkpointing it would recompute each block
    once per group, which costs far more.

    Returns False (and changes nothing) when this torch's pipelining does not have the expected
    ``stage_backward_weight(weights, param_groups, retain_graph)`` hook point.
    """
    try:
        from torch.distributed.pipelining import stage as stage_module
    except ImportError:
        return False
    current = getattr(stage_module, "stage_backward_weight", None)
    if current is None:
        return False
    if not _TORCH_PASS:
        if current is merged_stage_backward_weight:
            return False  # patched by someone else before us: the original is unknown
        if list(inspect.signature(current).parameters)[:2] != ["weights", "param_groups"]:
            return False
        _TORCH_PASS.append(current)
    stage_module.stage_backward_weight = merged_stage_backward_weight if enable else _TORCH_PASS[0]
    return True
