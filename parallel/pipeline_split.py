"""Cutting a LinearLlama into pipeline stages: a cost model, a balanced contiguous split, the
placement of stages on ranks, and the stage modules themselves.

Cost model (training FLOPs per token, forward + backward = 3x forward):

- a block: ``6 * (its matmul parameters)`` plus its token mixer, which for a softmax layer
  grows with the sequence (``6 * T * dim`` causal) and for a linear-attention layer is a
  chunk's worth (``6 * (64 + 2 * head_dim) * dim``);
- the head: ``6 * vocab * dim``, the output matmul and its two backward matmuls, all of which
  the chunked cross-entropy runs, times ``HEAD_TIME_PER_FLOP`` (0.8): its large GEMMs run
  faster per FLOP than a block's mix of GEMMs, linear attention and elementwise work (4 x H100,
  Linear-Llama3-1B at 32K, full checkpointing, per-rank stage busy times: the head took 2.55
  to 2.7 checkpointed blocks against 3.2 by FLOPs; at 8K without checkpointing ~3.45 plain
  blocks against the model's 3.1);
- the embedding: no matmul; its backward writes a dense ``vocab x dim`` gradient. Charged
  ``embedding_blocks`` (default 0.1) blocks: the same measurement put the first stage's time at
  its blocks' alone, within the noise.

Activation checkpointing recomputes a block's forward in its backward, so a checkpointed block
costs 4/3 of its plain training cost while the head (its loss computes every head product in
the forward, nothing is recomputed) stays at 3x forward.

Stages are contiguous runs of layers with the embedding on stage 0 and the norm and head on the
last stage; every middle stage holds at least one layer, the two end stages may hold none (the
embedding or the head can be a stage's whole work). What the split balances is each pipeline
*rank's* work, the sum over the stages it holds (with several stages per rank a per-stage
balance can pile the head and the embedding onto one rank: the V placement puts stage 0 and
the last stage together): :func:`parallel.pipeline_balance.balanced_split` minimises the busiest
rank's cost (to within 5%), then the busiest stage's, then the sum of squared stage costs.

Placement of ``S = pp * v`` stages on the ``pp`` ranks of a pipeline group:

- ``"loop"``: rank ``r`` holds stages ``r, r + pp, r + 2 pp, ...`` (GPipe, 1F1B, interleaved);
- ``"v"``: rank ``r`` holds stages ``r`` and ``2 pp - 1 - r`` (ZBVZeroBubble), so stage 0 and
  the last stage share rank 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from models.llama import LinearLlama, ModelArgs
from parallel.checkpointing import is_checkpointed
from parallel.pipeline_balance import balanced_split

__all__ = [
    "PipelineStageModel",
    "StepContext",
    "block_costs",
    "build_stage_module",
    "recomputed_blocks",
    "split_layers",
    "stage_ids_on_rank",
    "stage_sizes_problem",
    "stage_to_rank",
]

_LINEAR_CHUNK = 64
HEAD_TIME_PER_FLOP = 0.8  # the head's time per FLOP against a block's (module docstring)


def block_costs(
    args: ModelArgs,
    seq_len: int,
    *,
    embedding_blocks: float = 0.1,
    recomputed: Sequence[bool] | None = None,
) -> tuple[list[float], float, float]:
    """Per-block, embedding and head costs in training FLOPs per token.

    Args:
        args: the model shape.
        seq_len: tokens of one sequence as a stage sees them (after sequence sharding the
            causal softmax work per token still spans the whole sequence, so pass the full T).
        embedding_blocks: the embedding's cost in units of the mean (not recomputed) block cost.
        recomputed: ``[n_layers]``, True where activation checkpointing recomputes the block's
            forward in the backward (its cost times 4/3); None: no block is.

    Returns:
        ``(blocks [n_layers], embedding, head)``.
    """
    d, f, h = args.dim, args.ffn_dim, args.n_heads
    hd = d // h
    kv = (args.n_kv_heads or h) * hd
    if recomputed is not None and len(recomputed) != args.n_layers:
        raise ValueError(f"recomputed has {len(recomputed)} entries for {args.n_layers} layers")
    costs = []
    for kind in args.layer_kinds():
        if kind == "N":
            matmul = d * (d + 2 * kv) + d * d + 3 * d * f
            mixer = 6.0 * seq_len * d
        else:
            matmul = 4 * d * d + 3 * d * f
            mixer = 6.0 * (_LINEAR_CHUNK + 2 * hd) * d
        costs.append(6.0 * matmul + mixer)
    head = 6.0 * args.vocab_size * d * HEAD_TIME_PER_FLOP
    embedding = embedding_blocks * sum(costs) / len(costs)
    if recomputed is not None:
        costs = [c * (4.0 / 3.0 if r else 1.0) for c, r in zip(costs, recomputed)]
    return costs, embedding, head


def split_layers(
    args: ModelArgs,
    num_stages: int,
    *,
    seq_len: int,
    embedding_blocks: float = 0.1,
    pp: int | None = None,
    style: str = "loop",
    recomputed: Sequence[bool] | None = None,
    sizes: Sequence[int] | None = None,
) -> list[list[str]]:
    """Layer names (``"0"``.. as in ``model.layers``) of each of ``num_stages`` stages, by cost.

    ``pp`` ranks hold the stages (None: one stage per rank) in the placement ``style``; the
    split balances the ranks' summed cost (module docstring). ``recomputed`` marks the
    checkpointed blocks (:func:`block_costs`). ``sizes`` (``parallel.pp_stage_layers``) gives
    the layers per stage instead of the search.

    Raises ValueError when there are fewer layers than stages or the stages do not divide
    evenly over the ranks.
    """
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if args.n_layers < num_stages:
        raise ValueError(
            f"model.n_layers ({args.n_layers}) must be >= the number of pipeline "
            f"stages ({num_stages})"
        )
    pp = num_stages if pp is None else pp
    if pp < 1 or num_stages % pp:
        raise ValueError(f"{num_stages} stages do not divide over {pp} pipeline ranks")
    if sizes is not None:
        problem = stage_sizes_problem(sizes, num_stages, args.n_layers)
        if problem:
            raise ValueError(f"stage sizes {list(sizes)}: {problem}")
    else:
        per_rank = num_stages // pp
        ranks = [stage_to_rank(s, pp, per_rank, style) for s in range(num_stages)]
        costs, embedding, head = block_costs(
            args, seq_len, embedding_blocks=embedding_blocks, recomputed=recomputed
        )
        sizes = balanced_split(costs, embedding, head, ranks)
    names, start = [], 0
    for size in sizes:
        names.append([str(i) for i in range(start, start + size)])
        start += size
    return names


def stage_sizes_problem(sizes: Sequence[int], num_stages: int, n_layers: int) -> str | None:
    """What is wrong with explicit layers-per-stage ``sizes`` (``parallel.pp_stage_layers``),
    or None: one count per stage, all >= 0, summing to ``n_layers``, only the end stages
    empty (as the cost search places them)."""
    if len(sizes) != num_stages:
        return (
            f"{len(sizes)} entries; it needs one per pipeline stage (pp x stages per rank = "
            f"{num_stages})"
        )
    if sum(sizes) != n_layers or any(n < 0 for n in sizes):
        return f"counts must be >= 0 and sum to model.n_layers ({n_layers}), got sum {sum(sizes)}"
    if num_stages > 1 and any(n < 1 for n in sizes[1:-1]):
        return "only the first and the last stage may be empty"
    return None


def recomputed_blocks(n_layers: int, mode: str, every: int) -> list[bool] | None:
    """Which blocks activation checkpointing recomputes (None: none), by the wrapper's own rule
    (:func:`parallel.checkpointing.is_checkpointed`)."""
    if mode not in ("full", "partial"):
        return None
    return [is_checkpointed(i, mode, every) for i in range(n_layers)]


def stage_ids_on_rank(pp_rank: int, pp: int, stages_per_rank: int, style: str) -> list[int]:
    """Global stage indices held by ``pp_rank``, in execution order of its first microbatch."""
    if style == "loop":
        return [pp_rank + k * pp for k in range(stages_per_rank)]
    if style == "v":
        if stages_per_rank != 2:
            raise ValueError(f"the v placement holds 2 stages per rank, got {stages_per_rank}")
        return [pp_rank, 2 * pp - 1 - pp_rank]
    raise ValueError(f"placement style must be 'loop' or 'v', got {style!r}")


def stage_to_rank(stage: int, pp: int, stages_per_rank: int, style: str) -> int:
    """The pipeline rank holding global stage ``stage``."""
    for r in range(pp):
        if stage in stage_ids_on_rank(r, pp, stages_per_rank, style):
            return r
    raise ValueError(f"stage {stage} is outside 0..{pp * stages_per_rank - 1}")


@dataclass
class StepContext:
    """What every stage of a rank needs for the current step besides its activations.

    ``position_ids`` ``[T_local]`` (None: ``arange``); ``global_tokens`` the fp32 scalar the
    loss sum is divided by; ``labels`` the step's label microbatches ``m x [b, T_local]`` and
    ``microbatch`` the index the last stage is running (set by its ``PipelineStage``), so that
    labels never travel as forward arguments (old pipelining versions skip the input gradient
    of a stage when any forward input does not require grad); ``autocast_dtype`` the compute
    dtype (None: no autocast).
    """

    device_type: str = "cpu"
    autocast_dtype: torch.dtype | None = None
    position_ids: torch.Tensor | None = None
    global_tokens: torch.Tensor | None = None
    labels: tuple[torch.Tensor, ...] = ()
    microbatch: int = 0


class PipelineStageModel(LinearLlama):
    """A LinearLlama that holds only some of the layers (by their original names).

    Made by :func:`build_stage_module`, never constructed directly. ``forward(x)`` takes tokens
    ``[b, T]`` (first stage) or hidden ``[b, T, dim]``; it returns hidden ``[b, T, dim]``, or on
    the last stage ``[1]``: the current microbatch's summed loss divided by the step's global
    token count, so the head is used only inside the module's forward (FSDP unshards it there)
    and the logits never leave the stage.
    """

    ctx: StepContext
    computes_loss: bool
    # The first stage's embedding, when a last stage on the same rank uses it as its tied head
    # without a copy (a plain attribute: the parameter stays the first stage's alone).
    shared_embedding: nn.Embedding | None = None

    @property
    def head_weight(self) -> torch.Tensor:
        if self.output is None and self.shared_embedding is not None:
            return self.shared_embedding.weight
        return super().head_weight

    def parameters(self, recurse: bool = True):
        """This stage's parameters, and the shared embedding's weight after them: torch's
        pipelining computes a stage's weight gradients (its split weight pass included) for
        ``submod.parameters()``, so the head's share of that gradient is not missed. The
        weight stays out of ``named_parameters`` / ``state_dict`` (the first stage owns it);
        whoever collects the parameters of several stages must drop the repeat (the trainer
        does)."""
        yield from super().parameters(recurse)
        if self.shared_embedding is not None:
            yield self.shared_embedding.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx = self.ctx
        with torch.autocast(
            ctx.device_type, dtype=ctx.autocast_dtype, enabled=ctx.autocast_dtype is not None
        ):
            h = super().forward(x, position_ids=ctx.position_ids)
            if not self.computes_loss:
                return h
            labels = ctx.labels[ctx.microbatch]
            loss = (self.loss(h, labels) / ctx.global_tokens).reshape(1)
            # A copy, not a view: torch detaches the last stage's output in place once its
            # backward is done, which it cannot do to a view; the schedule keeps the outputs
            # to the step's end, and a view's graph would hold this microbatch's received
            # activation (and its gradient) that long.
            return loss.clone()


def build_stage_module(
    model: LinearLlama,
    layer_names: list[str],
    *,
    is_first: bool,
    is_last: bool,
    ctx: StepContext,
    share_tied_head: bool = False,
) -> PipelineStageModel:
    """A stage holding ``layer_names`` of ``model`` (the modules are shared, not copied).

    The first stage keeps ``tok_embeddings``, the last keeps ``norm`` and ``output``. With tied
    embeddings and a last stage that is not also the first, the last stage gets its own
    ``output`` Linear initialised from the embedding; :class:`parallel.pipeline.Pipeline` sums
    the two gradients every step so the copies stay identical (see its docstring). With
    ``share_tied_head`` (the first stage on the same rank, the V placement) it uses the
    embedding's own weight instead (``shared_embedding``), which then gets both gradients (the
    stage lists it in ``parameters()`` for torch's weight pass); only valid while the
    parameter is not sharded per stage (no FSDP).
    """
    stage = PipelineStageModel.__new__(PipelineStageModel)
    nn.Module.__init__(stage)
    # Everything the model holds (plain attributes, rope, ...), then the per-stage pieces.
    for key, value in vars(model).items():
        if not key.startswith("_"):
            object.__setattr__(stage, key, value)
    for name, child in model._modules.items():
        stage._modules[name] = child
    stage._parameters.update(model._parameters)
    stage._buffers.update(model._buffers)
    stage.ctx = ctx
    stage.computes_loss = is_last
    stage.tok_embeddings = model.tok_embeddings if is_first else None
    stage.layers = nn.ModuleDict({name: model.layers[name] for name in layer_names})
    stage.norm = model.norm if is_last else None
    stage.output = model.output if is_last else None
    tied_elsewhere = is_last and not is_first and model.output is None
    if tied_elsewhere and share_tied_head:
        object.__setattr__(stage, "shared_embedding", model.tok_embeddings)
    elif tied_elsewhere and model.tok_embeddings is not None:
        emb = model.tok_embeddings.weight
        head = nn.Linear(emb.shape[1], emb.shape[0], bias=False, device=emb.device, dtype=emb.dtype)
        with torch.no_grad():
            head.weight.copy_(emb)
        stage.output = head
    return stage
