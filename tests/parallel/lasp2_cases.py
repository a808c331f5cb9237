"""What the LASP-2 exactness tests share (the serial schedule's, ``test_lasp2_serial.py``, and the
in-op exchange's, ``test_lasp2_fused.py``): inputs for the three non-delta families, the fp64
naive reference with its gradients, and one rank's sharded serial-schedule run."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["lasp2_inputs", "naive_reference", "output_weight", "serial_rank_run"]


def lasp2_inputs(
    family: str, T: int, *, seed: int, K: int, V: int, dtype=torch.float32, gate_shift=0.0
):
    """``q, k [2, T, 2, K]``, ``v [2, T, 2, V]`` and ``gates`` (a 1-tuple: None for "linear",
    a scalar log gate ``[2, T, 2]`` for "scalar", a per-channel one ``[2, T, 2, K]`` for
    "gla"; ``logsigmoid(randn + gate_shift)``; for "fixed" one log decay per head expanded
    over B and T, as the lightning and retention layers pass theirs, taking no gradient)."""
    g = torch.Generator().manual_seed(seed)
    B, H = 2, 2
    q, k = (torch.randn(B, T, H, K, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=g, dtype=dtype)
    if family == "linear":
        gates = (None,)
    elif family == "scalar":
        gates = (F.logsigmoid(torch.randn(B, T, H, generator=g, dtype=dtype) + gate_shift),)
    elif family == "fixed":
        per_head = F.logsigmoid(torch.randn(H, generator=g, dtype=dtype) + gate_shift)
        gates = (per_head.view(1, 1, H).expand(B, T, H),)
    else:
        gates = (F.logsigmoid(torch.randn(B, T, H, K, generator=g, dtype=dtype) + gate_shift),)
    return q, k, v, gates


def output_weight(o_shape) -> torch.Tensor:
    """The fixed fp64 weight the tests' losses put on the output: ``sum(o * w)``."""
    return torch.arange(torch.Size(o_shape).numel(), dtype=torch.float64).view(o_shape).sin()


def naive_reference(family, q, k, v, gates):
    """The fp64 naive recurrence's output and the gradients of ``sum(o * w)`` for q, k, v and
    the gate (when there is one that takes a gradient)."""
    from models.ops import naive_gla, naive_linear_attn

    fn = naive_gla if family == "gla" else naive_linear_attn
    trained = gates if family != "fixed" else ()
    leaves = [t.double().clone().requires_grad_() for t in (q, k, v, *trained) if t is not None]
    args = leaves[:3] + ([leaves[3]] if len(leaves) > 3 else [None])
    if family == "fixed":
        args[3] = gates[0].double()
    o, _ = fn(*args)
    (o * output_weight(o.shape)).sum().backward()
    return o.detach(), [t.grad for t in leaves]


def serial_rank_run(rank, world, family, layout, q, k, v, gates):
    """This rank's shard through LASP-2's serial schedule on the default group: its output and
    the gradients of its shard of ``sum(o * w)`` for its shards of q, k, v and the gate."""
    import torch.distributed as dist

    from parallel.lasp2 import lasp2_gla, lasp2_linear_attn
    from parallel.sequence_shard import shard_sequence

    kw = {"dim": 1, "rank": rank, "world": world, "layout": layout}
    trained = gates if family != "fixed" else ()
    local = [
        shard_sequence(t, **kw).clone().requires_grad_()
        for t in (q, k, v, *trained)
        if t is not None
    ]
    fn = lasp2_gla if family == "gla" else lasp2_linear_attn
    args = local[:3] + ([local[3]] if len(local) > 3 else [None])
    if family == "fixed":  # the per-head view at the local length, as the layer builds it
        args[3] = gates[0].narrow(1, 0, local[0].shape[1])
    o = fn(*args, group=dist.group.WORLD, layout=layout, schedule="serial")
    w = shard_sequence(output_weight((q.shape[0], q.shape[1], q.shape[2], v.shape[-1])), **kw)
    (o.double() * w).sum().backward()
    return o.detach(), [t.grad for t in local]
