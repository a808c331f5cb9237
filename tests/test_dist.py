"""dist/: environment reading (torchrun, SLURM), ParallelDims and its mesh."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from dist import ParallelDims, read_dist_env
from dist.init import first_slurm_host
from tests.dist_harness import run_ranks


def test_torchrun_env():
    e = read_dist_env(
        {
            "RANK": "3",
            "WORLD_SIZE": "8",
            "LOCAL_RANK": "1",
            "MASTER_ADDR": "n1",
            "MASTER_PORT": "1234",
        }
    )
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port, e.source) == (
        3,
        8,
        1,
        "n1",
        1234,
        "torchrun",
    )


def test_slurm_env_without_torchrun():
    e = read_dist_env(
        {
            "SLURM_PROCID": "9",
            "SLURM_NTASKS": "16",
            "SLURM_LOCALID": "1",
            "SLURM_JOB_NODELIST": "gpu[007-008]",
            "SLURM_JOB_ID": "4242",
        }
    )
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.source) == (
        9,
        16,
        1,
        "gpu007",
        "slurm",
    )
    assert 20000 <= e.master_port < 40000


def test_single_process_env():
    assert read_dist_env({}).source == "single"
    assert read_dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).world_size == 1


@pytest.mark.parametrize(
    "nodes, first", [("node1", "node1"), ("a[3-5],b2", "a3"), ("gpu[010,012]", "gpu010")]
)
def test_first_slurm_host(nodes, first):
    assert first_slurm_host(nodes) == first


def test_parallel_dims_validation_and_coords():
    d = ParallelDims(pp=2, dp=-1, sp=2, world_size=8)
    assert d.dp == 2
    assert d.coords(5) == {"pp": 1, "dp": 0, "sp": 1}
    with pytest.raises(ValueError, match="world size"):
        ParallelDims(pp=2, dp=2, sp=2, world_size=6)
    with pytest.raises(ValueError, match="parallel.sp"):
        ParallelDims(pp=1, sp=0, world_size=2)


def _mesh_worker(rank, world):
    d = ParallelDims(pp=2, dp=1, sp=2, world_size=world)
    d.build_mesh("cpu")
    return {name: dist.get_process_group_ranks(d.group(name)) for name in ("pp", "sp", "dp_sp")}


@pytest.mark.timeout(120)
def test_mesh_groups():
    res = run_ranks(_mesh_worker, 4)
    assert res[0]["sp"] == [0, 1] and res[3]["sp"] == [2, 3]
    assert res[0]["pp"] == [0, 2] and res[1]["pp"] == [1, 3]
    assert res[2]["dp_sp"] == [2, 3]
