"""Pipeline parallelism with torch.distributed.pipelining: stages by cost, schedules by name.

:func:`build_pipeline` cuts a LinearLlama into ``pp * parallel.pp_stages_per_rank`` stages
(:mod:`parallel.pipeline_split`), keeps this rank's stages, applies sequence parallelism,
activation checkpointing and FSDP to each (:func:`parallel.parallelize.parallelize_model`), and
wraps them in ``PipelineStage`` objects (receive buffers held only while in use,
:mod:`parallel.pipeline_recv`) run by the schedule that ``parallel.pp_schedule`` names
(GPipe, 1F1B, Interleaved1F1B, InterleavedZeroBubble, ZBVZeroBubble; placement "loop" for all
but ZBV, which uses "v").

The loss. The last stage computes, inside its forward, each microbatch's summed cross-entropy
divided by the step's global target-token count; the schedule runs with ``scale_grads=False``
and the schedule's loss function is the identity, so the microbatch losses add up to exactly
the loss of the run without PP, and so do the gradients.

Tied embeddings. The first stage owns the embedding matrix and the last stage needs it as the
head. The last stage keeps its own copy (``output.weight``, initialised from the embedding) and
:meth:`Pipeline.sync_tied_gradients`, which the trainer calls once per optimizer step after all
micro-steps, replaces both gradients by their sum (over a two-rank group of the first and last
pipeline ranks with the same dp/sp coordinates). Both copies then see the same gradient and the
same AdamW update, so they stay equal and training matches single-process tied training. The
copy is marked so that gradient clipping counts it once
(:func:`parallel.data_parallel.exclude_from_grad_norm`). Checkpoints of the last stage hold the
copy as ``output.weight``. When one rank holds both stages (the V placement) the head uses the
embedding's own weight, no copy (a vocabulary x dim matrix with its gradient and optimizer state
less on that rank), unless FSDP shards the stages separately (then the copy is summed locally).
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    PipelineScheduleMulti,
    PipelineScheduleSingle,
    get_schedule_class,
)

from dist.logging import get_logger
from dist.parallel_dims import ParallelDims
from models.env_settings import env_setting
from models.llama import LinearLlama
from parallel.data_parallel import exclude_from_grad_norm
from parallel.deferred_wgrad import WeightGradStore, defer_linear_weight_grads
from parallel.parallelize import parallelize_model
from parallel.pipeline_recv import OnDemandRecvStage
from parallel.pipeline_split import (
    StepContext,
    build_stage_module,
    recomputed_blocks,
    split_layers,
    stage_ids_on_rank,
    stage_to_rank,
)
from parallel.pipeline_weight_grad import ZB_BACKWARD_MODES, install_zero_bubble_backward

__all__ = ["SCHEDULES", "Pipeline", "build_pipeline", "placement_style"]

# Schedule name (torch.distributed.pipelining's) -> stage placement. How many stages per rank
# each needs is checked with the config (launch.config._validate_pipeline).
SCHEDULES = {
    "GPipe": "loop",
    "1F1B": "loop",
    "Interleaved1F1B": "loop",
    "InterleavedZeroBubble": "loop",
    "ZBVZeroBubble": "v",
}


def placement_style(schedule: str) -> str:
    """``"v"`` for the V-shaped schedules, ``"loop"`` otherwise."""
    if schedule not in SCHEDULES:
        raise ValueError(f"parallel.pp_schedule must be one of {list(SCHEDULES)}, got {schedule!r}")
    return SCHEDULES[schedule]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class _LastStage(OnDemandRecvStage):
    """The last stage: tells its module which microbatch's labels the forward is for."""

    ctx: StepContext

    def forward_one_chunk(self, fwd_chunk_id: int, *args, **kwargs):
        self.ctx.microbatch = fwd_chunk_id
        return super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)


class Pipeline:
    """This rank's stages and the schedule that runs them.

    Attributes:
        model_parts: this rank's stage modules (:class:`PipelineStageModel`), in stage order.
        stage_ids: their global stage indices.
        layer_split: the layer names of every stage (all ranks), for logs and benchmarks.
    """

    def __init__(
        self,
        *,
        model_parts: list[nn.Module],
        stages: list[PipelineStage],
        schedule,
        ctx: StepContext,
        dims: ParallelDims,
        layer_split: list[list[str]],
        stage_ids: list[int],
        layout: str,
        tie: tuple | None,
        n_microbatches: int,
        wgrad_stores: list[WeightGradStore] | None = None,
    ) -> None:
        self.model_parts = model_parts
        self.stages = stages
        self.schedule = schedule
        self.ctx = ctx
        self.dims = dims
        self.layer_split = layer_split
        self.stage_ids = stage_ids
        self.layout = layout
        self.num_stages = len(layer_split)
        self.n_microbatches = n_microbatches
        self.has_first = 0 in stage_ids
        self.has_last = self.num_stages - 1 in stage_ids
        # (embedding module or None, head copy module or None, group or None)
        self._tie = tie
        self._wgrad_stores = wgrad_stores or []

    def _shard(self, x: torch.Tensor) -> torch.Tensor:
        if not self.dims.sp_enabled:
            return x
        from parallel.sequence_shard import shard_sequence

        return shard_sequence(
            x, dim=1, rank=self.dims.local_rank_in("sp"), world=self.dims.sp, layout=self.layout
        )

    def step(self, batch, global_tokens: torch.Tensor) -> torch.Tensor:
        """Forward and backward of one batch ``inputs/labels [B, T]`` through the pipeline.

        The batch is sharded over SP, then split into the schedule's microbatches along B.
        Returns this rank's share of the loss (its microbatch sums / ``global_tokens``; zero on
        ranks without the last stage), a detached fp32 scalar.
        """
        inputs = batch.inputs.to(global_tokens.device, non_blocking=True)
        labels = batch.labels.to(global_tokens.device, non_blocking=True)
        pos = None
        if self.dims.sp_enabled:
            from parallel.sequence_shard import shard_position_ids

            pos = shard_position_ids(
                inputs.shape[1],
                rank=self.dims.local_rank_in("sp"),
                world=self.dims.sp,
                layout=self.layout,
                device=global_tokens.device,
            )
        inputs, labels = self._shard(inputs), self._shard(labels)
        ctx = self.ctx
        ctx.position_ids, ctx.global_tokens, ctx.microbatch = pos, global_tokens, 0
        # The schedule splits the inputs the same way (tensor_split along the batch).
        ctx.labels = labels.tensor_split(self.n_microbatches) if self.has_last else ()
        losses: list[torch.Tensor] = []
        args = (inputs,) if self.has_first else ()
        target = labels if self.has_last else None
        self.schedule.step(*args, target=target, losses=losses)
        if any(store.pending for store in self._wgrad_stores):
            raise RuntimeError(
                "deferred weight gradients were left unapplied after the pipeline step: the "
                f"schedule {type(self.schedule).__name__} ran a backward without its weight pass"
            )
        if not self.has_last:
            return torch.zeros((), dtype=torch.float32, device=global_tokens.device)
        return torch.stack([loss.detach().float().sum() for loss in losses]).sum()

    def sync_tied_gradients(self) -> None:
        """Sum the embedding's and the head copy's gradients into both (tied embeddings only).

        Call once per optimizer step, after the last micro-step and before the optimizer.
        """
        if self._tie is None:
            return
        emb, head, group = self._tie
        params = [m.weight for m in (emb, head) if m is not None]
        if not params:  # a middle pipeline rank
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if len(params) == 2:
            a, b = _local(params[0].grad), _local(params[1].grad)
            a.add_(b)
            b.copy_(a)
        else:
            dist.all_reduce(_local(params[0].grad), group=group)


def _tie_group(dims: ParallelDims, first_pp: int, last_pp: int):
    """The two-rank group joining pipeline ranks ``first_pp`` and ``last_pp`` at this rank's
    (dp, sp) coordinates; every rank takes part in creating all of them."""
    if dims.pp == 2:
        return dims.group("pp")
    stride = dims.dp * dims.sp
    pairs = [[first_pp * stride + i, last_pp * stride + i] for i in range(stride)]
    group, _ = dist.new_subgroups_by_enumeration(pairs)
    return group


ZERO_BUBBLE_SCHEDULES = ("InterleavedZeroBubble", "ZBVZeroBubble")
_ZB_CKPT_DEFAULT = "fused"


def build_pipeline(
    model: LinearLlama,
    dims: ParallelDims,
    cfg,
    *,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
) -> Pipeline:
    """Split ``model`` for this rank's pipeline stages and build the schedule ``cfg`` names.

    ``model`` must be built identically (same seed) on every rank; the modules this rank does
    not hold are dropped with it. Needs ``dims.build_mesh`` done and ``dims.pp > 1``.
    """
    p, t = cfg.parallel, cfg.training
    style = placement_style(p.pp_schedule)
    per_rank = p.pp_stages_per_rank
    num_stages = dims.pp * per_rank
    m = p.pp_microbatches or num_stages
    layer_split = split_layers(
        model.args,
        num_stages,
        seq_len=t.seq_len,
        pp=dims.pp,
        style=style,
        recomputed=recomputed_blocks(
            model.args.n_layers, p.activation_checkpointing, p.checkpoint_every
        ),
        sizes=p.pp_stage_layers,
    )
    pp_rank = dims.local_rank_in("pp")
    stage_ids = stage_ids_on_rank(pp_rank, dims.pp, per_rank, style)
    ctx = StepContext(device_type=device.type, autocast_dtype=autocast_dtype)
    tied = model.args.tie_embeddings and model.output is None
    first_pp = stage_to_rank(0, dims.pp, per_rank, style)
    last_pp = stage_to_rank(num_stages - 1, dims.pp, per_rank, style)

    # How the zero-bubble schedules run their backward. "deferred" (deferred_wgrad.py, the
    # default without FSDP and without full checkpointing): B is a full backward in which the
    # blocks' linear layers leave (x, dy) for W, so no graph outlives B (4 x H100, pp 4, 8K:
    # ZBV 1.10x 1F1B's throughput; torch's split 1.08x at more memory; with one block in four
    # checkpointed 1.03x at 0.98x 1F1B's memory). With full checkpointing it also recomputes
    # nothing twice, but what waits for W is what checkpointing exists to drop (32K, pp 2 x
    # sp 2: 76.5 GB against 1F1B's 20.3), so there "fused" runs the whole backward in
    # the input slot (32K, pp 2, 2 x H100: ZBV 3.16 s / 30.6 GB and InterleavedZeroBubble
    # 3.09 s / 32.9 GB against 1F1B's 3.12 s / 28.0 GB). torch's split (input pass, per-group
    # weight pass; with FSDP and no checkpointing) keeps the whole graph until W and replays a
    # checkpointed block once per parameter group; the merged weight pass took 4.68 / 4.06 s at
    # 66.5 / 55.2 GB. LINSCALE_PP_ZB_BACKWARD (auto, deferred, split, merged, fused) overrides.
    zb_mode = None
    if p.pp_schedule in ZERO_BUBBLE_SCHEDULES:
        zb_mode = env_setting("LINSCALE_PP_ZB_BACKWARD", "auto", ("auto", *ZB_BACKWARD_MODES))
        deferrable = not p.fsdp and "dw_builder" in inspect.signature(PipelineStage).parameters
        if zb_mode == "deferred" and not deferrable:
            raise ValueError(
                "LINSCALE_PP_ZB_BACKWARD=deferred needs parallel.fsdp false (FSDP reduces the "
                "gradients inside the backward, before the deferred weight pass) and a torch "
                "whose PipelineStage takes dw_builder"
            )
        if zb_mode == "auto":
            if p.activation_checkpointing == "full":
                zb_mode = _ZB_CKPT_DEFAULT
            elif deferrable:
                zb_mode = "deferred"
            else:
                zb_mode = "split" if p.activation_checkpointing == "none" else _ZB_CKPT_DEFAULT
        if not install_zero_bubble_backward(zb_mode) and zb_mode not in ("split", "deferred"):
            get_logger().warning(
                "parallel.pp_schedule %s: this torch's pipelining has no hook for the %s "
                "backward; its own split runs (a checkpointed block is recomputed once per "
                "parameter group)",
                p.pp_schedule,
                zb_mode,
            )
    extra = {
        "checkpoint_every": p.checkpoint_every,
        "lasp2_schedule": p.lasp2_schedule,
        "grad_reduce_dtype": p.grad_reduce_dtype,
        "fsdp_reshard_after_forward": p.fsdp_reshard_after_forward,
        "compile": cfg.training.compile,
    }
    # With the first and the last stage on one rank (V placement) the head uses the embedding
    # itself, unless FSDP shards the two stages apart.
    share_head = tied and first_pp == last_pp and not p.fsdp
    # All stages first (the last one may copy the embedding), then parallelise each.
    parts: list[nn.Module] = [
        build_stage_module(
            model,
            layer_split[s],
            is_first=s == 0,
            is_last=s == num_stages - 1,
            ctx=ctx,
            share_tied_head=share_head,
        )
        for s in stage_ids
    ]
    for part in parts:
        parallelize_model(
            part,
            dims,
            layout=p.layout,
            activation_checkpointing=p.activation_checkpointing,
            fsdp=p.fsdp,
            **extra,
        )

    tie = None
    if tied and not share_head:
        group = _tie_group(dims, first_pp, last_pp) if first_pp != last_pp else None
        emb = next((q.tok_embeddings for q, s in zip(parts, stage_ids) if s == 0), None)
        head = next((q.output for q, s in zip(parts, stage_ids) if s == num_stages - 1), None)
        if head is not None:
            exclude_from_grad_norm(head.weight)
        tie = (emb, head, group)

    pp_group = dims.group("pp")
    stages, stores = [], []
    for part, s in zip(parts, stage_ids):
        stage_cls = _LastStage if s == num_stages - 1 else OnDemandRecvStage
        kw = {}
        if zb_mode == "deferred":
            store = defer_linear_weight_grads(part, max_waiting=p.pp_zb_max_pending_w)
            stores.append(store)
            kw["dw_builder"] = store.builder
        stage = stage_cls(part, s, num_stages, device, group=pp_group, **kw)
        if zb_mode == "deferred":
            stores[-1].arm(stage)
        stage.ctx = ctx
        stages.append(stage)
    cls = get_schedule_class(p.pp_schedule)
    kwargs = {"n_microbatches": m, "loss_fn": _identity_loss}
    if "scale_grads" in inspect.signature(cls.__init__).parameters:
        kwargs["scale_grads"] = False  # the loss is already a sum / global tokens
    if issubclass(cls, PipelineScheduleSingle):
        if len(stages) != 1:
            raise ValueError(
                f"parallel.pp_schedule {p.pp_schedule} runs one stage per rank, "
                f"got parallel.pp_stages_per_rank = {per_rank}"
            )
        schedule = cls(stages[0], **kwargs)
    else:
        assert issubclass(cls, PipelineScheduleMulti), cls
        schedule = cls(stages, **kwargs)
    get_logger().info(
        "pipeline %s: %d stages (%d per rank, %s placement), %d microbatches, layers per stage %s",
        p.pp_schedule,
        num_stages,
        per_rank,
        style,
        m,
        [len(names) for names in layer_split],
    )
    return Pipeline(
        model_parts=parts,
        stages=stages,
        schedule=schedule,
        ctx=ctx,
        dims=dims,
        layer_split=layer_split,
        stage_ids=stage_ids,
        layout=p.layout,
        tie=tie,
        n_microbatches=m,
        wgrad_stores=stores,
    )


def _identity_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The last stage already returns its loss ``[1]``; the schedule backpropagates from it."""
    del target
    return output.sum()
