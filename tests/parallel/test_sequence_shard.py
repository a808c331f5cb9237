"""Shard helpers and the conv halo exchange (gloo, 2/3/4 ranks), plus pure-function checks."""

from __future__ import annotations

import pytest
import torch
from sp_harness import check_case
from sp_worker import case_names

from parallel.sequence_shard import (
    local_slices,
    merge_shards,
    shard_position_ids,
    shard_sequence,
    slice_owner,
)

CASES = [c for c in case_names("ops", 2) if c.startswith(("shard", "conv"))]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("world", (2, 3, 4))
def test_distributed_case(world: int, case: str) -> None:
    check_case("ops", world, case)


@pytest.mark.parametrize("layout", ("contiguous", "zigzag"))
@pytest.mark.parametrize("world", (1, 2, 3, 4))
def test_shard_roundtrip(world: int, layout: str) -> None:
    x = torch.randn(2, 12 * world, 3)
    shards = [shard_sequence(x, dim=1, rank=r, world=world, layout=layout) for r in range(world)]
    assert torch.equal(merge_shards(shards, dim=1, layout=layout), x)
    for j in range(world * (2 if layout == "zigzag" else 1)):
        r, slot = slice_owner(j, world, layout)
        assert local_slices(r, world, layout)[slot] == j


def test_zigzag_positions() -> None:
    assert shard_position_ids(8, rank=0, world=2, layout="zigzag").tolist() == [0, 1, 6, 7]
    assert shard_position_ids(8, rank=1, world=2, layout="zigzag").tolist() == [2, 3, 4, 5]
    assert shard_position_ids(8, rank=1, world=2, layout="contiguous").tolist() == [4, 5, 6, 7]


def test_errors() -> None:
    with pytest.raises(ValueError, match="layout"):
        shard_sequence(torch.zeros(8), dim=0, rank=0, world=2, layout="striped")
    with pytest.raises(ValueError, match="divisible"):
        shard_sequence(torch.zeros(6), dim=0, rank=0, world=2, layout="zigzag")
