"""``parallel.grad_reduce_dtype=bf16``: gradients summed over dp x sp in bf16, on gloo ranks.

The sums must be bf16 sums (every reduced element representable in bf16) of the right
gradients (close to the exact fp32 sum, to bf16 rounding); the fp32 default stays exact. The
trainer's three reduction paths (DDP, the all-reduce after the backward under PP, FSDP's
reduce-scatter) each train 5 steps next to the single-process run.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from launch.config import ConfigError, load_config
from parallel.data_parallel import allreduce_gradients, reduce_dtype_of
from parallel.ddp import apply_ddp
from tests.dist_harness import run_ranks
from tests.parallel.pp_harness import BASE, reference, worker


def _is_bf16(t: torch.Tensor) -> bool:
    return bool(torch.equal(t.bfloat16().float(), t))


def _local_grads(rank: int):
    gen = torch.Generator().manual_seed(10 + rank)
    return [torch.randn(37, generator=gen), torch.randn(5, 3, generator=gen) * 1e-3]


def _allreduce_worker(rank, world, dtype_name):
    grads = _local_grads(rank)
    params = [nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    # a tiny bucket limit: one bucket per tensor, so both the loop and the last flush run
    allreduce_gradients(
        params, dist.group.WORLD, bucket_mb=1e-4, reduce_dtype=reduce_dtype_of(dtype_name)
    )
    return [p.grad for p in params]


def _ddp_worker(rank, world, dtype_name):
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    ref = nn.Linear(8, 4)
    ref.load_state_dict(model.state_dict())
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(rank))
    ddp = apply_ddp(model, dist.group.WORLD, reduce_dtype=reduce_dtype_of(dtype_name))
    ddp(x).square().sum().backward()
    ref(x).square().sum().backward()
    exact = [p.grad.clone() for p in ref.parameters()]
    for g in exact:
        dist.all_reduce(g)
    return [p.grad for p in model.parameters()], exact


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
def test_allreduce_gradients_dtype(dtype_name, tmp_path):
    results = run_ranks(_allreduce_worker, 2, dtype_name)
    exact = [a + b for a, b in zip(_local_grads(0), _local_grads(1))]
    for got in results:
        for g, e in zip(got, exact):
            assert g.dtype == torch.float32
            if dtype_name == "fp32":
                torch.testing.assert_close(g, e, rtol=1e-6, atol=0)
            else:
                assert _is_bf16(g), "the bf16 sum must hold bf16 values"
                torch.testing.assert_close(g, e, rtol=1e-2, atol=1e-2 * float(e.abs().max()))
    if dtype_name == "fp32":
        assert not all(_is_bf16(g) for g in results[0])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
def test_ddp_hook_dtype(dtype_name):
    for got, exact in run_ranks(_ddp_worker, 2, dtype_name):
        for g, e in zip(got, exact):
            assert g.dtype == torch.float32
            if dtype_name == "bf16":
                assert _is_bf16(g)
                torch.testing.assert_close(g, e, rtol=1e-2, atol=1e-2 * float(e.abs().max()))
            else:
                torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7)


def test_bad_reduce_dtype_is_named():
    with pytest.raises(ValueError, match="parallel.grad_reduce_dtype"):
        reduce_dtype_of("fp16")
    with pytest.raises(ConfigError, match="grad_reduce_dtype"):
        load_config(None, [*BASE, "parallel.grad_reduce_dtype=fp16"])
    with pytest.raises(ValueError, match="reduce_dtype"):
        apply_ddp(nn.Linear(2, 2), None, reduce_dtype=torch.float16)


TRAINER_CASES = {
    "dp2xsp2-ddp": ["parallel.dp=2", "parallel.sp=2"],
    "dp2xsp2-fsdp": ["parallel.dp=2", "parallel.sp=2", "parallel.fsdp=true"],
    "pp2xdp2-allreduce": ["parallel.pp=2", "parallel.dp=2", "parallel.pp_microbatches=2"],
}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("case", list(TRAINER_CASES))
def test_trainer_bf16_gradient_sum(case, tmp_path_factory):
    """Step 1's loss is the single-process one exactly (same weights); its gradient norm is the
    single-process norm to bf16 rounding but not to fp32 rounding (the sum really was bf16);
    the 5-step loss curve stays within 1e-3 of the fp32 one."""
    ref_losses, ref_norms, _ = reference(str(tmp_path_factory.getbasetemp() / "reference"), ())
    extra = [*TRAINER_CASES[case], "parallel.grad_reduce_dtype=bf16"]
    results = run_ranks(worker, 4, str(tmp_path_factory.mktemp("run")), extra)
    for res in results:
        assert abs(res["losses"][0] - ref_losses[0]) <= 1e-6 * abs(ref_losses[0])
        rel = abs(res["norms"][0] - ref_norms[0]) / ref_norms[0]
        assert 1e-7 < rel < 1e-2, (rel, res["norms"][0], ref_norms[0])
        torch.testing.assert_close(
            torch.tensor(res["losses"]), torch.tensor(ref_losses), rtol=1e-3, atol=0
        )
