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
  to 2.7 checkpointed blocks against 3.2 by FLOPs); about 3.4 plain blocks for Linear-Llama3-1B;
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
the last stage together). It minimises the busiest rank's cost (to within 5%), then the busiest
stage's, then the sum of squared stage costs, by a branch and bound over the stage sizes.

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

__all__ = [
    "PipelineStageModel",
    "StepContext",
    "block_costs",
    "build_stage_module",
    "recomputed_blocks",
    "split_layers",
    "stage_ids_on_rank",
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


_REL = 1e-9  # relative tolerance: the same costs summed in another order must tie


def _search(
    costs: list[float],
    first: float,
    last: float,
    ranks: list[int],
    *,
    minimise: str,
    rank_cap: float = float("inf"),
    stage_cap: float = float("inf"),
    node_limit: int = 1_000_000,
) -> tuple[float, list[int] | None]:
    """Depth-first branch and bound over contiguous group sizes (see
    :func:`_rank_balanced_split`): the smallest busiest-rank cost (``minimise="rank"``),
    busiest-group cost (``"stage"``) or sum of squared group costs (``"squares"``) among the
    splits whose rank and group costs stay within the caps. Only strict improvements are kept,
    so ties go to the first split found (largest early groups first). Returns
    ``(value, sizes)``, sizes None when nothing fits the caps."""
    n, m = len(ranks), len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    min_size = [1] * n
    if n > 1:
        min_size[0] = min_size[-1] = 0
    later_min = [0] * (n + 1)
    for s in range(n - 1, -1, -1):
        later_min[s] = later_min[s + 1] + min_size[s]
    future = [sorted(set(ranks[s:])) for s in range(n)] + [[]]
    rank_cost = [0.0] * (max(ranks) + 1)
    sizes = [0] * n
    best, best_sizes, nodes = float("inf"), None, 0

    def visit(s: int, a: int, value: float) -> None:
        """``value``: the objective of groups 0..s-1 (a max, or a sum of squares)."""
        nonlocal best, best_sizes, nodes
        nodes += 1
        if nodes > node_limit:
            return
        r = ranks[s]
        r_cap = min(rank_cap, best) if minimise == "rank" else rank_cap
        s_cap = min(stage_cap, best) if minimise == "stage" else stage_cap
        hi = m if s == n - 1 else m - later_min[s + 1]
        lo = m if s == n - 1 else a + min_size[s]
        # Largest groups first: filling each group up to what the bounds allow finds a good
        # split at once, and the later, smaller candidates are mostly pruned.
        for b in range(hi, lo - 1, -1):
            c = prefix[b] - prefix[a] + (first if s == 0 else 0.0) + (last if s == n - 1 else 0.0)
            if rank_cost[r] + c > r_cap * (1 + _REL) or c > s_cap * (1 + _REL):
                continue
            if minimise == "rank":
                new_value = max(value, rank_cost[r] + c)
            elif minimise == "stage":
                new_value = max(value, c)
            else:
                new_value = value + c * c
            if new_value >= best * (1 - _REL):
                continue
            if s == n - 1:
                best, best_sizes = new_value, [*sizes[:s], b - a]
                return
            rank_cost[r] += c
            left = prefix[m] - prefix[b] + last
            fut = future[s + 1]
            groups_left = n - s - 1
            room = sum(r_cap - rank_cost[q] for q in fut)
            # What is left can at best be spread evenly over the ranks / groups to come.
            if minimise == "rank":
                lower = max(new_value, (sum(rank_cost[q] for q in fut) + left) / len(fut))
            elif minimise == "stage":
                lower = max(new_value, left / groups_left, last)
            else:
                lower = new_value + left * left / groups_left
            fits = room >= left * (1 - _REL) and left <= s_cap * groups_left * (1 + _REL)
            if lower < best * (1 - _REL) and fits:
                sizes[s] = b - a
                visit(s + 1, b, new_value)
            rank_cost[r] -= c

    visit(0, 0, 0.0)
    return best, best_sizes


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


def _evaluate(
    sizes: list[int], costs: list[float], first: float, last: float, ranks: list[int]
) -> tuple[float, float, float]:
    """``(busiest rank, busiest group, sum of squared group costs)`` of a split."""
    rank_cost = [0.0] * (max(ranks) + 1)
    stage_cost, a, n = [], 0, len(sizes)
    for s, size in enumerate(sizes):
        c = sum(costs[a : a + size]) + (first if s == 0 else 0.0) + (last if s == n - 1 else 0.0)
        rank_cost[ranks[s]] += c
        stage_cost.append(c)
        a += size
    return max(rank_cost), max(stage_cost), sum(c * c for c in stage_cost)


RANK_SLACK = 0.05  # busiest-rank cost given up for a lighter busiest stage (see below)


def _objective(
    sizes: list[int],
    costs: list[float],
    first: float,
    last: float,
    ranks: list[int],
    rank_best: float,
) -> tuple[float, float, float, float]:
    """The order :func:`_rank_balanced_split` minimises: the busiest rank when it exceeds
    ``(1 + RANK_SLACK) * rank_best`` (else 0), the busiest stage, the busiest rank, the sum of
    squared stage costs."""
    rank, stage, squares = _evaluate(sizes, costs, first, last, ranks)
    over = rank if rank > rank_best * (1 + RANK_SLACK) * (1 + _REL) else 0.0
    return over, stage, rank, squares


def _rank_balanced_split(
    costs: list[float], first: float, last: float, ranks: list[int], *, node_limit: int = 60_000
) -> list[int]:
    """Sizes of ``len(ranks)`` contiguous groups of ``costs``; group ``s`` runs on rank
    ``ranks[s]``, group 0 also carries ``first`` and the last group ``last``.

    Finds the least busiest-rank cost B; then, among the splits whose busiest rank stays within
    ``(1 + RANK_SLACK) B``, minimises the busiest group's cost, then the busiest rank's, then
    the sum of squared group costs (:func:`_objective`). The slack: with several stages per
    rank a heavy stage stalls the ranks that wait for it (4 x H100, pp 4, ZBV, 8K, one block in
    three checkpointed: the rank-optimal split, its last stage two layers plus the head, ran
    0.493 s with a 0.26 bubble, where balanced stages at a few per cent more rank cost run
    ~0.42 s). Middle groups hold at least one item, the end groups may hold none (a single
    group holds everything). Each step is a depth-first branch and bound over the group sizes,
    pruned by lower bounds (the ranks or groups still to come share what is left at best
    evenly). It is exhaustive for a few dozen layers over up to 16 stages; beyond
    ``node_limit`` visits per step it keeps the best split found, and the per-group balanced
    split (:func:`_min_max_split`) when that is better. Deterministic either way.
    """
    kw = {"node_limit": node_limit}
    rank_best, sizes = _search(costs, first, last, ranks, minimise="rank", **kw)
    assert sizes is not None
    cap = rank_best * (1 + RANK_SLACK) if len(set(ranks)) < len(ranks) else rank_best
    stage_best, by_stage = _search(costs, first, last, ranks, minimise="stage", rank_cap=cap, **kw)
    if by_stage is not None:
        rank_again, by_rank = _search(
            costs, first, last, ranks, minimise="rank", rank_cap=cap, stage_cap=stage_best, **kw
        )
        sizes = by_rank or by_stage
        _, by_squares = _search(
            costs,
            first,
            last,
            ranks,
            minimise="squares",
            rank_cap=rank_again if by_rank else cap,
            stage_cap=stage_best,
            **kw,
        )
        sizes = by_squares or sizes
    candidates = [sizes, _min_max_split(costs, first, last, len(ranks))]
    return min(candidates, key=lambda c: _objective(c, costs, first, last, ranks, rank_best))


def split_layers(
    args: ModelArgs,
    num_stages: int,
    *,
    seq_len: int,
    embedding_blocks: float = 0.1,
    pp: int | None = None,
    style: str = "loop",
    recomputed: Sequence[bool] | None = None,
) -> list[list[str]]:
    """Layer names (``"0"``.. as in ``model.layers``) of each of ``num_stages`` stages, by cost.

    ``pp`` ranks hold the stages (None: one stage per rank) in the placement ``style``; the
    split balances the ranks' summed cost (module docstring). ``recomputed`` marks the
    checkpointed blocks (:func:`block_costs`).

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
    per_rank = num_stages // pp
    ranks = [stage_to_rank(s, pp, per_rank, style) for s in range(num_stages)]
    costs, embedding, head = block_costs(
        args, seq_len, embedding_blocks=embedding_blocks, recomputed=recomputed
    )
    sizes = _rank_balanced_split(costs, embedding, head, ranks)
    names, start = [], 0
    for size in sizes:
        names.append([str(i) for i in range(start, start + size)])
        start += size
    return names


def recomputed_blocks(n_layers: int, mode: str, every: int) -> list[bool] | None:
    """Which blocks activation checkpointing recomputes, as
    :func:`parallel.checkpointing.apply_activation_checkpointing` picks them (None: none)."""
    if mode == "full":
        return [True] * n_layers
    if mode == "partial":
        return [i % every == every - 1 for i in range(n_layers)]
    return None


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
            return (self.loss(h, labels) / ctx.global_tokens).reshape(1)


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
