"""Pipeline stages whose receive buffers exist only while a microbatch needs them.

torch.distributed.pipelining's ``PipelineStage`` allocates, when a schedule first runs, one
receive buffer per microbatch and input (``args_recv_info[mb][i].buffer``: the activation a
non-first stage receives) and per microbatch and output (``grad_recv_info[mb][i].buffer``: the
gradient a non-last stage receives), and keeps all of them for the stage's lifetime; the
received activations also keep their input gradient (``.grad``, set by the backward) until the
next step starts. At 32K tokens of a 2048-wide model each is 134 MB in bf16 and 268 MB in
fp32, and ``m`` microbatches make ``m`` of each per receiving stage, while a schedule has only
its in-flight microbatches' worth of them in use (1F1B's last stage: one). The V placement,
with two stages per rank, receives twice as often and pays twice.

:class:`OnDemandRecvStage` allocates a buffer when the schedule posts the receive into it and
drops its reference when the forward (activations) or the backward (gradients) of that
microbatch has consumed it. What the autograd graph and the stage's caches still need, they
still hold: only the stage's own references go. On the last stage the schedule keeps each
microbatch's loss, and with it the graph down to the received input, until the step ends;
once the microbatch's backward is done the loss is cut from its graph (its value stays).
Between uses each buffer is a zero-size placeholder of its dtype (so that torch's code reading
``.buffer`` between steps works, and a receive into a buffer never allocated fails loudly on
the shape instead of being skipped).

``LINSCALE_PP_RECV_BUFFERS=preallocated`` restores torch's behaviour (for A/B runs).
"""

from __future__ import annotations

import torch
from torch.distributed.pipelining import PipelineStage

from models.env_settings import env_setting

__all__ = ["OnDemandRecvStage", "recv_buffers_on_demand"]


def recv_buffers_on_demand() -> bool:
    """Whether stages allocate receive buffers per use (the default) or keep torch's."""
    mode = env_setting("LINSCALE_PP_RECV_BUFFERS", "on_demand", ("on_demand", "preallocated"))
    return mode == "on_demand"


class _Spec:
    """Shape, dtype, device and ``requires_grad`` of one receive buffer."""

    __slots__ = ("shape", "stride", "dtype", "device", "requires_grad")

    def __init__(self, t: torch.Tensor) -> None:
        self.shape, self.stride, self.dtype, self.device = t.shape, t.stride(), t.dtype, t.device
        self.requires_grad = t.requires_grad

    def empty(self) -> torch.Tensor:
        t = torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=self.device)
        return t.requires_grad_(self.requires_grad)

    def placeholder(self) -> torch.Tensor:
        t = torch.empty(0, dtype=self.dtype, device=self.device)
        return t.requires_grad_(self.requires_grad)


def _receiving(infos) -> list:
    """The entries of one microbatch's recv-info tuple that receive a tensor."""
    out = []
    for info in infos or ():
        if getattr(info, "is_root_arg", False) or not hasattr(info, "buffer"):
            continue  # a model input of the first stage (older torch: a placeholder object)
        out.append(info)
    return out


class OnDemandRecvStage(PipelineStage):
    """A ``PipelineStage`` that holds a receive buffer only from its receive to its use.

    Same constructor and behaviour as ``PipelineStage``; only the lifetime of the receive
    buffers changes (see the module docstring).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._on_demand = recv_buffers_on_demand()
        # last stage, split backward: microbatch -> its loss, cut from the graph after W
        self._losses_awaiting_w: dict[int, torch.Tensor] = {}

    def _park(self, infos) -> None:
        """Drop the stage's reference to each buffer of ``infos``, keeping its spec."""
        for info in _receiving(infos):
            buf = info.buffer
            if buf is None or buf.numel() == 0:
                continue  # an output without gradient (nothing received), or parked already
            info._linscale_spec = spec = _Spec(buf)
            info.buffer = spec.placeholder()

    def _unpark(self, infos) -> None:
        """Give every parked buffer of ``infos`` fresh memory of its shape."""
        for info in _receiving(infos):
            spec = getattr(info, "_linscale_spec", None)
            if spec is not None and info.buffer is not None and info.buffer.numel() == 0:
                info.buffer = spec.empty()

    def _park_all(self) -> None:
        for table in (self.args_recv_info, getattr(self, "grad_recv_info", {})):
            for infos in table.values():
                self._park(infos)

    # Set-up: torch allocates every microbatch's buffers here; release them at once.
    def _prepare_forward_infra(self, *args, **kwargs):
        out = super()._prepare_forward_infra(*args, **kwargs)
        if self._on_demand:
            self._park_all()
        return out

    def _prepare_backward_infra(self, *args, **kwargs):
        out = super()._prepare_backward_infra(*args, **kwargs)
        if self._on_demand:
            self._park_all()
        return out

    # Receives: memory from the moment the receive is posted.
    def get_fwd_recv_ops(self, fwd_chunk_id: int):
        if self._on_demand:
            self._unpark(self.args_recv_info[fwd_chunk_id])
        return super().get_fwd_recv_ops(fwd_chunk_id)

    def get_bwd_recv_ops(self, bwd_chunk_id: int):
        if self._on_demand:
            self._unpark(self.grad_recv_info[bwd_chunk_id])
        return super().get_bwd_recv_ops(bwd_chunk_id)

    def set_local_bwd_input(self, next_stage_bwd_outputs, mb_index: int) -> None:
        # torch zeroes the buffer of an output whose local gradient is None: give it memory.
        if self._on_demand and any(t is None for t in next_stage_bwd_outputs):
            infos = _receiving(self.grad_recv_info[mb_index])
            self._unpark(
                [i for i, t in zip(infos, next_stage_bwd_outputs, strict=False) if t is None]
            )
        return super().set_local_bwd_input(next_stage_bwd_outputs, mb_index)

    # Uses: once consumed, the stage lets go (the graph and caches keep what they need).
    def forward_one_chunk(self, fwd_chunk_id: int, *args, **kwargs):
        out = super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)
        if self._on_demand and not self.is_first:
            self._park(self.args_recv_info[fwd_chunk_id])
        return out

    def backward_one_chunk(self, bwd_chunk_id: int, *args, **kwargs):
        out = super().backward_one_chunk(bwd_chunk_id, *args, **kwargs)
        if not self._on_demand:
            return out
        if not self.is_last:
            self._park(self.grad_recv_info[bwd_chunk_id])
        else:
            loss = kwargs.get("loss", args[0] if args else None)
            if kwargs.get("full_backward", args[1] if len(args) > 1 else True):
                _drop_graph(loss)
            else:  # the weight pass still walks the graph
                self._losses_awaiting_w[bwd_chunk_id] = loss
        return out

    def backward_weight_one_chunk(self, bwd_chunk_id: int, *args, **kwargs):
        out = super().backward_weight_one_chunk(bwd_chunk_id, *args, **kwargs)
        if self._on_demand and self.is_last:
            _drop_graph(self._losses_awaiting_w.pop(bwd_chunk_id, None))
        return out


def _drop_graph(loss) -> None:
    """Cut a microbatch's loss from its graph once the backward is done with it.

    The schedule keeps every microbatch's loss until the step ends (to report it), and the
    loss's graph keeps the stage input alive through its gradient accumulator: on the last
    stage that was one received activation per microbatch (0.27 GB at 32K x 2048 in fp32)
    held until the step's end. The value stays; only the graph goes.
    """
    if isinstance(loss, torch.Tensor) and loss.grad_fn is not None and not loss._is_view():
        loss.detach_()
