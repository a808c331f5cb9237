"""Stage splitting, placement and the pipeline config checks (no processes)."""

from __future__ import annotations

import pytest
import torch

from launch.config import ConfigError, load_config, validate
from models.llama import LinearLlama
from models.presets import get_preset
from parallel.pipeline_split import (
    StepContext,
    block_costs,
    build_stage_module,
    split_layers,
    stage_ids_on_rank,
    stage_to_rank,
)


def test_split_weighs_head_and_embedding():
    args = get_preset("linear-llama3-1b")
    costs, emb, head = block_costs(args, 32768)
    assert 3.5 < head / costs[0] < 4.5  # 6 V D against ~6 x 67M: the head is ~4 blocks
    sizes = [len(s) for s in split_layers(args, 4, seq_len=32768)]
    assert sum(sizes) == 16 and sizes[-1] == min(sizes) and sizes[-1] < 16 / 4
    stage_cost = []
    for k, names in enumerate(split_layers(args, 4, seq_len=32768)):
        c = sum(costs[int(n)] for n in names) + (emb if k == 0 else 0) + (head if k == 3 else 0)
        stage_cost.append(c)
    assert max(stage_cost) / min(stage_cost) < 1.3


def test_split_keeps_names_contiguous_and_counts_softmax_layers():
    args = get_preset("tiny", n_layers=12, layer_pattern="LLLN")
    stages = split_layers(args, 3, seq_len=65536)  # softmax layers dominate at this length
    assert [n for s in stages for n in s] == [str(i) for i in range(12)]
    assert all(stages)
    with pytest.raises(ValueError, match="n_layers"):
        split_layers(args, 13, seq_len=64)


@pytest.mark.parametrize("pp", [2, 4])
def test_placement(pp):
    loop = [stage_ids_on_rank(r, pp, 2, "loop") for r in range(pp)]
    assert loop[0] == [0, pp] and sorted(s for ids in loop for s in ids) == list(range(2 * pp))
    v = [stage_ids_on_rank(r, pp, 2, "v") for r in range(pp)]
    assert v[0] == [0, 2 * pp - 1] and sorted(s for ids in v for s in ids) == list(range(2 * pp))
    assert stage_to_rank(2 * pp - 1, pp, 2, "v") == 0
    assert stage_to_rank(2 * pp - 1, pp, 2, "loop") == pp - 1


def test_stage_modules_share_layers_and_copy_tied_head():
    torch.manual_seed(0)
    model = LinearLlama(get_preset("tiny", dim=32, ffn_dim=64, n_heads=2))
    ctx = StepContext()
    first = build_stage_module(model, ["0", "1"], is_first=True, is_last=False, ctx=ctx)
    last = build_stage_module(model, ["2", "3"], is_first=False, is_last=True, ctx=ctx)
    assert first.layers["1"] is model.layers["1"] and list(last.layers) == ["2", "3"]
    assert first.norm is None and last.tok_embeddings is None
    assert torch.equal(last.output.weight, model.tok_embeddings.weight)
    assert last.output.weight is not model.tok_embeddings.weight
    names = {n for part in (first, last) for n, _ in part.named_parameters()}
    assert names == {n for n, _ in model.named_parameters()} | {"output.weight"}
    tokens = torch.randint(0, 256, (2, 16))
    labels = torch.randint(0, 256, (2, 16))
    ctx.global_tokens, ctx.labels = torch.tensor(32.0), (labels,)
    loss = last(first(tokens))
    expected = model.loss(model(tokens), labels) / 32
    torch.testing.assert_close(loss, expected.reshape(1))


BAD = [
    (["parallel.pp=2", "parallel.pp_microbatches=1"], "must be >= parallel.pp"),
    (["parallel.pp=2", "parallel.pp_schedule=ZBVZeroBubble"], "exactly 2 stages per rank"),
    (["parallel.pp=2", "parallel.pp_schedule=Interleaved1F1B"], "at least 2 stages per rank"),
    (["parallel.pp=2", "parallel.pp_stages_per_rank=2"], "runs one stage per rank"),
    (
        ["parallel.pp=4", "parallel.pp_stages_per_rank=2", "parallel.pp_schedule=Interleaved1F1B"],
        "n_layers",
    ),
    (
        [
            "parallel.pp=2",
            "parallel.pp_stages_per_rank=2",
            "parallel.pp_microbatches=3",
            "parallel.pp_schedule=InterleavedZeroBubble",
        ],
        "multiple of parallel.pp",
    ),
]


@pytest.mark.parametrize("overrides,message", BAD)
def test_bad_pipeline_configs_fail_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_microbatches_must_divide_the_local_batch():
    cfg = load_config(
        None,
        [
            "parallel.pp=2",
            "parallel.pp_microbatches=3",
            "parallel.pp_schedule=GPipe",
            "training.batch_size=8",
        ],
    )
    with pytest.raises(ConfigError, match="pp_microbatches"):
        validate(cfg, world_size=4)
    cfg = load_config(
        None, ["parallel.pp=2", "parallel.pp_microbatches=4", "training.batch_size=8"]
    )
    validate(cfg, world_size=4)  # dp 2: 4 sequences per rank, 4 microbatches
