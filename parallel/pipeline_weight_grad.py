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
again). :func:`install_zero_bubble_backward` chooses between torch's split, this merged pass,
and a fused backward that does not split at all.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch.autograd.graph import GradientEdge

__all__ = [
    "ZB_BACKWARD_MODES",
    "fused_stage_backward_input",
    "install_zero_bubble_backward",
    "merged_stage_backward_weight",
]


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


_TORCH: dict = {}  # torch's own stage_backward_input / stage_backward_weight, to restore them

ZB_BACKWARD_MODES = ("deferred", "split", "merged", "fused")


def fused_stage_backward_input(stage_outputs_or_loss, output_grads, input_values, weights):
    """Drop-in for ``stage_backward_input`` that runs the whole backward at once: input and
    weight gradients (accumulated into ``.grad``) in one pass that frees the graph, and no
    parameter groups, so the schedule's deferred weight pass has nothing left to do."""
    from torch.distributed.pipelining._backward import stage_backward

    del weights
    if output_grads is None:  # the last stage: a tuple holding the loss, which seeds itself
        output_grads = [None] * len(stage_outputs_or_loss)
    return stage_backward(stage_outputs_or_loss, output_grads, input_values), []


def install_zero_bubble_backward(mode: str) -> bool:
    """How the zero-bubble schedules' backward runs, process-wide (torch looks the two
    functions up in its ``stage`` module at call time):

    - ``"split"``: torch's input pass and per-group weight pass. Exact, and 1F1B's work
      without checkpointing (the same aten FLOPs per step: ``test_pipeline_flops.py``); with
      checkpointing each block is recomputed once per parameter group.
    - ``"merged"``: torch's input pass, then :func:`merged_stage_backward_weight`: one
      recompute of a checkpointed block in the weight pass, but the engine also runs the nodes
      between the groups' intermediates (the input-gradient backward again).
    - ``"fused"``: :func:`fused_stage_backward_input`: the whole backward in the input slot
      (one recompute, nothing retained), an empty weight pass. The schedule's order stays;
      its weight slots no longer fill bubbles.
    - ``"deferred"``: torch's functions stay (the stages take the
      :mod:`parallel.deferred_wgrad` path, which does not call them).

    Returns False (and changes nothing) when this torch's pipelining lacks the expected hook
    points ``stage_backward_input(outputs, grads, inputs, weights)`` and
    ``stage_backward_weight(weights, param_groups, retain_graph)``.
    """
    if mode not in ZB_BACKWARD_MODES:
        raise ValueError(f"zero-bubble backward mode must be one of {ZB_BACKWARD_MODES}: {mode!r}")
    try:
        from torch.distributed.pipelining import stage as stage_module
    except ImportError:
        return False
    if not _TORCH:
        bi = getattr(stage_module, "stage_backward_input", None)
        bw = getattr(stage_module, "stage_backward_weight", None)
        if bi is None or bw is None or bw is merged_stage_backward_weight:
            return False
        if list(inspect.signature(bw).parameters)[:2] != ["weights", "param_groups"]:
            return False
        if len(inspect.signature(bi).parameters) != 4:
            return False
        _TORCH.update(input=bi, weight=bw)
    stage_module.stage_backward_input = (
        fused_stage_backward_input if mode == "fused" else _TORCH["input"]
    )
    stage_module.stage_backward_weight = (
        merged_stage_backward_weight if mode == "merged" else _TORCH["weight"]
    )
    return True
