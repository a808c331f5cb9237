"""Pipeline parallelism composed with dp and sp on 4 gloo ranks: 5 training steps give the
single-process losses and final parameters, to fp32 rounding.

Every configuration runs the real :class:`launch.trainer.Trainer` from config alone, in one
spawned world of 4 processes; the reference is the same config in this process (world 1).
"""

from __future__ import annotations

import functools

import pytest
import torch

from launch.config import load_config
from launch.trainer import Trainer
from tests.dist_harness import run_ranks

BASE = ["model.preset=tiny", "training.steps=5", "training.batch_size=8",
        "training.seq_len=32", "training.warmup_steps=2", "training.lr=1e-3",
        "training.dtype=fp32", "training.device=cpu", "data.max_files=8",
        "checkpoint.enabled=false", "logging.progress=false"]


def _config(run_dir, name: str, extra: list[str]):
    return load_config(None, [*BASE, f"logging.run_dir={run_dir}", f"logging.name={name}",
                              *extra])


def _clean(name: str) -> str:
    for wrapper in ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module."):
        name = name.replace(wrapper, "")
    return name


def _full_params(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every parameter this rank holds, by its name in the full model, as a full fp32 tensor."""
    out = {}
    for part in trainer.model_parts:
        for name, p in part.named_parameters():
            t = p.detach()
            if hasattr(t, "full_tensor"):
                t = t.full_tensor()
            out[_clean(name)] = t.float().clone()
    return out


def _worker(rank: int, world: int, run_dir: str, extra: list[str]):
    trainer = Trainer(_config(run_dir, f"w{rank}", extra))
    losses = [h.loss for h in trainer.train()]
    return {"losses": losses, "params": _full_params(trainer),
            "split": getattr(trainer.pipeline, "layer_split", None)}


@functools.lru_cache(maxsize=4)
def _reference(run_dir: str, model_extra: tuple[str, ...]):
    trainer = Trainer(_config(run_dir, "ref", list(model_extra)))
    losses = [h.loss for h in trainer.train()]
    return losses, _full_params(trainer)


def _check(results: list[dict], ref_losses: list[float], ref_params: dict, *, tied: bool):
    for r, res in enumerate(results):
        torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(ref_losses),
                                   rtol=1e-5, atol=1e-6, msg=lambda m, r=r: f"rank {r}: {m}")
    seen = set()
    for r, res in enumerate(results):
        for name, value in res["params"].items():
            ref_name = name
            if tied and name == "output.weight":
                ref_name = "tok_embeddings.weight"  # the last stage's copy of the tied matrix
            assert ref_name in ref_params, f"rank {r}: unexpected parameter {name}"
            torch.testing.assert_close(value, ref_params[ref_name], rtol=1e-4, atol=2e-6,
                                       msg=lambda m, r=r, n=name: f"rank {r} {n}: {m}")
            seen.add(ref_name)
    assert seen == set(ref_params), f"parameters held by no rank: {set(ref_params) - seen}"


# (id, parallel overrides, model overrides)
CASES = [
    ("pp2xdp2_1f1b", ["parallel.pp=2", "parallel.dp=2", "parallel.pp_schedule=1F1B",
                      "parallel.pp_microbatches=2"], []),
    ("pp2xsp2_gpipe", ["parallel.pp=2", "parallel.sp=2", "parallel.pp_schedule=GPipe",
                       "parallel.pp_microbatches=4"], []),
    ("pp4_interleaved1f1b", ["parallel.pp=4", "parallel.pp_schedule=Interleaved1F1B",
                             "parallel.pp_stages_per_rank=2", "parallel.pp_microbatches=4"],
     ["model.n_layers=8"]),
    ("pp2xdp2_zbv", ["parallel.pp=2", "parallel.dp=2", "parallel.pp_schedule=ZBVZeroBubble",
                     "parallel.pp_stages_per_rank=2", "parallel.pp_microbatches=4"], []),
]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_pipeline_matches_single_process(case, tmp_path_factory):
    _, parallel, model = case
    ref_dir = str(tmp_path_factory.getbasetemp() / "pp_reference")
    ref_losses, ref_params = _reference(ref_dir, tuple(model))
    results = run_ranks(_worker, 4, str(tmp_path_factory.mktemp("pp")), [*parallel, *model])
    _check(results, ref_losses, ref_params, tied=True)
