"""Cutting a LinearLlama into pipeline stages: a cost model, a balanced contiguous split, the
placement of stages on ranks, and the stage modules themselves.

Cost model (training FLOPs per token, forward + backward = 3x forward):

- a block: ``6 * (its matmul parameters)`` plus its token mixer, which for a softmax layer
  grows with the sequence (``6 * T * dim`` causal) and for a linear-attention layer is a
  chunk's worth (``6 * (64 + 2 * head_dim) * dim``);
- the head: ``6 * vocab * dim``, the output matmul and its two backward matmuls, all of which
  the chunked cross-entropy runs (for Linear-Llama3-1B that is about four blocks);
- the embedding: no matmul, but its backward writes a dense ``vocab x dim`` gradient and its
  parameters carry optimizer state; it is charged ``embedding_blocks`` (default 0.5) blocks.

Stages are contiguous runs of layers, at least one layer each, with the embedding on stage 0
and the norm and head on the last stage. The split minimises the largest stage cost, then the
sum of squared stage costs among those splits (so the slack is spread evenly).

Placement of ``S = pp * v`` stages on the ``pp`` ranks of a pipeline group:

- ``"loop"``: rank ``r`` holds stages ``r, r + pp, r + 2 pp, ...`` (GPipe, 1F1B, interleaved);
- ``"v"``: rank ``r`` holds stages ``r`` and ``2 pp - 1 - r`` (ZBVZeroBubble), so stage 0 and
  the last stage share rank 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.llama import LinearLlama, ModelArgs

__all__ = [
    "PipelineStageModel",
    "StepContext",
    "block_costs",
    "build_stage_module",
    "split_layers",
    "stage_ids_on_rank",
    "stage_to_rank",
]

_LINEAR_CHUNK = 64


def block_costs(
    args: ModelArgs, seq_len: int, *, embedding_blocks: float = 0.5
) -> tuple[list[float], float, float]:
    """Per-block, embedding and head costs in training FLOPs per token.

    Args:
        args: the model shape.
        seq_len: tokens of one sequence as a stage sees them (after sequence sharding the
            causal softmax work per token still spans the whole sequence, so pass the full T).
        embedding_blocks: the embedding's cost in units of the mean block cost.

    Returns:
        ``(blocks [n_layers], embedding, head)``.
    """
    d, f, h = args.dim, args.ffn_dim, args.n_heads
    hd = d // h
    kv = (args.n_kv_heads or h) * hd
    costs = []
    for kind in args.layer_kinds():
        if kind == "N":
            matmul = d * (d + 2 * kv) + d * d + 3 * d * f
            mixer = 6.0 * seq_len * d
        else:
            matmul = 4 * d * d + 3 * d * f
            mixer = 6.0 * (_LINEAR_CHUNK + 2 * hd) * d
        costs.append(6.0 * matmul + mixer)
    head = 6.0 * args.vocab_size * d
    embedding = embedding_blocks * sum(costs) / len(costs)
    return costs, embedding, head


def _min_max_split(costs: list[float], first: float, last: float, n: int) -> list[int]:
    """Sizes of ``n`` contiguous groups (>= 1 item each) of ``costs``: min max, then min sumsq."""
    m = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(s: int, a: int, b: int) -> float:  # stage s holds items a..b-1
        return prefix[b] - prefix[a] + (first if s == 0 else 0.0) + (last if s == n - 1 else 0.0)

    inf = float("inf")
    # best_max[s][b]: the smallest possible max cost of stages 0..s covering items 0..b-1.
    best_max = [[inf] * (m + 1) for _ in range(n)]
    for b in range(1, m + 1):
        best_max[0][b] = cost(0, 0, b)
    for s in range(1, n):
        for b in range(s + 1, m + 1):
            best_max[s][b] = min(max(best_max[s - 1][a], cost(s, a, b)) for a in range(s, b))
    bound = best_max[n - 1][m] * (1 + 1e-9)
    # Among splits whose every stage stays within the bound, the one with least sum of squares.
    sq = [[inf] * (m + 1) for _ in range(n)]
    cut = [[0] * (m + 1) for _ in range(n)]
    for b in range(1, m + 1):
        c = cost(0, 0, b)
        if c <= bound:
            sq[0][b] = c * c
    for s in range(1, n):
        for b in range(s + 1, m + 1):
            for a in range(s, b):
                c = cost(s, a, b)
                if c <= bound and sq[s - 1][a] + c * c < sq[s][b]:
                    sq[s][b], cut[s][b] = sq[s - 1][a] + c * c, a
    sizes, b = [], m
    for s in range(n - 1, 0, -1):
        a = cut[s][b]
        sizes.append(b - a)
        b = a
    sizes.append(b)
    return sizes[::-1]


def split_layers(
    args: ModelArgs, num_stages: int, *, seq_len: int, embedding_blocks: float = 0.5
) -> list[list[str]]:
    """Layer names (``"0"``.. as in ``model.layers``) of each of ``num_stages`` stages, by cost.

    Raises ValueError when there are fewer layers than stages.
    """
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if args.n_layers < num_stages:
        raise ValueError(
            f"model.n_layers ({args.n_layers}) must be >= the number of pipeline "
            f"stages ({num_stages})"
        )
    costs, embedding, head = block_costs(args, seq_len, embedding_blocks=embedding_blocks)
    sizes = _min_max_split(costs, embedding, head, num_stages)
    names, start = [], 0
    for size in sizes:
        names.append([str(i) for i in range(start, start + size)])
        start += size
    return names


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx = self.ctx
        with torch.autocast(
            ctx.device_type, dtype=ctx.autocast_dtype, enabled=ctx.autocast_dtype is not None
        ):
            h = super().forward(x, position_ids=ctx.position_ids)
            if not self.computes_loss:
                return h
            labels = ctx.labels[ctx.microbatch]
            return (self.loss(h, labels) / ctx.global_tokens).reshape(1)


def build_stage_module(
    model: LinearLlama, layer_names: list[str], *, is_first: bool, is_last: bool, ctx: StepContext
) -> PipelineStageModel:
    """A stage holding ``layer_names`` of ``model`` (the modules are shared, not copied).

    The first stage keeps ``tok_embeddings``, the last keeps ``norm`` and ``output``. With tied
    embeddings and a last stage that is not also the first, the last stage gets its own
    ``output`` Linear initialised from the embedding; :class:`parallel.pipeline.Pipeline` sums
    the two gradients every step so the copies stay identical (see its docstring).
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
    if is_last and model.output is None and model.tok_embeddings is not None and not is_first:
        emb = model.tok_embeddings.weight
        head = nn.Linear(emb.shape[1], emb.shape[0], bias=False, device=emb.device, dtype=emb.dtype)
        with torch.no_grad():
            head.weight.copy_(emb)
        stage.output = head
    return stage
