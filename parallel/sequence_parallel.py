"""Apply sequence parallelism to a model from outside, by swapping its op hooks.

The model stays parallelism-free: its layers call ``self.attn_op`` / ``self.conv_op``, and this
module replaces those attributes with the SP versions bound to a process group and layout:

- ``LinearAttention`` (``op_family`` in linear_attn / gla / gated_delta_rule): LASP-2
  (or the LASP-1 ring for ``linear_attn`` when ``linear_impl="lasp1"``, benchmarks only);
- ``SoftmaxAttention``: LASP-2H;
- ``ShortConvolution``: the halo-exchange conv around the layer's own ``conv_op``.

The caller shards the inputs (:mod:`parallel.sequence_shard`) and passes the shard's global
``position_ids`` to the model; the loss must be a sum over tokens divided by the global token
count, with gradients summed over the SP group (as over data-parallel replicas).
"""

from __future__ import annotations

import functools
import inspect

import torch.distributed as dist
from torch import nn

from parallel.conv_halo import sp_causal_conv
from parallel.lasp2 import lasp2_gated_delta_rule, lasp2_gla, lasp2_linear_attn, resolve_op
from parallel.lasp2h import lasp2h_attention
from parallel.ring import lasp1_linear_attn
from parallel.sequence_shard import check_layout

__all__ = ["apply_sequence_parallel", "remove_sequence_parallel"]

_LASP2 = {
    "linear_attn": lasp2_linear_attn,
    "gla": lasp2_gla,
    "gated_delta_rule": lasp2_gated_delta_rule,
}
_ORIGINAL = "_sp_original_op"


def _intra_op(family: str, attn_op):
    """Turn a layer's ``attn_op`` (returns o) back into an op returning ``(o, ht)``.

    The layer's default op is looked up in :mod:`models.ops`; a custom hook is kept only when it
    accepts ``initial_state``/``output_final_state`` (LASP-2 needs the final state)."""
    base = resolve_op(family)
    # models.layers' default ops carry the kernel backend the layer chose; keep it.
    backend = getattr(attn_op, "backend", None)
    if (
        backend in ("auto", "triton", "reference")
        and "backend" in inspect.signature(base).parameters
    ):
        return functools.partial(base, backend=backend)
    return base


def _swap(module: nn.Module, attr: str, new) -> None:
    if not hasattr(module, _ORIGINAL):
        setattr(module, _ORIGINAL, getattr(module, attr))
    setattr(module, attr, new)


def apply_sequence_parallel(
    model: nn.Module,
    *,
    group: dist.ProcessGroup | None,
    layout: str = "contiguous",
    linear_impl: str = "lasp2",
    lasp2_schedule: str = "overlap",
) -> nn.Module:
    """Swap every SP-relevant hook of ``model`` in place and return it.

    Args:
        model: a module tree containing ``LinearAttention``, ``SoftmaxAttention`` and
            ``ShortConvolution`` layers.
        group: the SP process group (a group of one rank leaves results unchanged).
        layout: ``"contiguous"`` or ``"zigzag"``; must match how the inputs were sharded.
        linear_impl: ``"lasp2"`` or ``"lasp1"`` (the ring baseline, ``linear_attn`` family and
            contiguous layout only).
        lasp2_schedule: ``"overlap"`` or ``"serial"`` for the linear_attn and gla families (see
            :func:`parallel.lasp2.lasp2_linear_attn`); the delta rule has one schedule.
    """
    from models.layers.linear_attention import LinearAttention
    from models.layers.short_conv import ShortConvolution
    from models.layers.softmax_attention import SoftmaxAttention

    check_layout(layout)
    if linear_impl not in ("lasp2", "lasp1"):
        raise ValueError(f"linear_impl must be 'lasp2' or 'lasp1', got {linear_impl!r}")
    if linear_impl == "lasp1" and layout != "contiguous":
        raise ValueError("linear_impl='lasp1' supports only layout='contiguous'")
    for module in model.modules():
        if isinstance(module, LinearAttention):
            family = module.op_family
            original = getattr(module, _ORIGINAL, module.attn_op)
            op = _intra_op(family, original)
            if linear_impl == "lasp1":
                if family != "linear_attn":
                    raise ValueError(
                        f"linear_impl='lasp1' supports only the linear_attn family, not {family!r}"
                    )
                new = functools.partial(lasp1_linear_attn, group=group, op=op)
            else:
                kw = {} if family == "gated_delta_rule" else {"schedule": lasp2_schedule}
                new = functools.partial(_LASP2[family], group=group, layout=layout, op=op, **kw)
            _swap(module, "attn_op", new)
        elif isinstance(module, SoftmaxAttention):
            _swap(
                module, "attn_op", functools.partial(lasp2h_attention, group=group, layout=layout)
            )
        elif isinstance(module, ShortConvolution):
            original = getattr(module, _ORIGINAL, module.conv_op)
            _swap(
                module,
                "conv_op",
                functools.partial(sp_causal_conv, group=group, layout=layout, conv_op=original),
            )
    return model


def remove_sequence_parallel(model: nn.Module) -> nn.Module:
    """Restore the hooks saved by :func:`apply_sequence_parallel`."""
    for module in model.modules():
        if hasattr(module, _ORIGINAL):
            attr = "conv_op" if hasattr(module, "conv_op") else "attn_op"
            setattr(module, attr, getattr(module, _ORIGINAL))
            delattr(module, _ORIGINAL)
    return model
