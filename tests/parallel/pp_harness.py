"""Exactness harness for pp x dp x sp (and FSDP) compositions of the real trainer.

``run_case(extra, model_extra, tmp)`` trains 5 steps in a spawned world of 4 gloo ranks from
config alone and compares every rank's losses, gradient norms and final parameters with the
same config trained in this process (world 1). The model is the tiny preset narrowed to
dim 64: the wider tiny model's 5-step trajectory amplifies fp32 rounding (Adam normalises
rounding-level gradients to full-size steps) until even single-process grad_accum=4 and
grad_accum=1 part at 1e-2 in the gradient norm, which would hide real errors.
"""

from __future__ import annotations

import functools

import torch

from launch.config import load_config
from launch.trainer import Trainer
from tests.dist_harness import run_ranks

__all__ = ["BASE", "check", "config", "reference", "resume_worker", "run_case", "worker"]

BASE = [
    "model.preset=tiny",
    "model.dim=64",
    "model.ffn_dim=128",
    "model.n_heads=2",
    "training.steps=5",
    "training.batch_size=8",
    "training.seq_len=32",
    "training.warmup_steps=2",
    "training.lr=1e-3",
    "training.dtype=fp32",
    "training.device=cpu",
    "data.max_files=8",
    "checkpoint.enabled=false",
    "logging.progress=false",
]
WORLD = 4


def config(run_dir, name: str, extra: list[str]):
    """The harness's base config under ``run_dir/name`` with ``extra`` overrides."""
    return load_config(None, [*BASE, f"logging.run_dir={run_dir}", f"logging.name={name}", *extra])


def resume_worker(rank: int, world: int, run_dir: str, extra: list[str]):
    """4 steps straight, and 4 steps cut at step 2 (DCP checkpoint) and resumed: returns the
    straight run's losses and the resumed run's (steps 3-4) for ``run_ranks``."""
    straight = Trainer(config(run_dir, "straight", [*extra, "training.steps=4"])).train()
    cut = [*extra, "training.steps=4", "checkpoint.enabled=true", "checkpoint.interval=2"]
    Trainer(config(run_dir, "cut", cut)).train(stop_at=2)
    resumed = Trainer(config(run_dir, "cut", cut))
    assert resumed.step == 2
    return [h.loss for h in straight], [h.loss for h in resumed.train()]


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
            if hasattr(t, "full_tensor"):  # FSDP2 shard: gather (a collective over dp_sp)
                t = t.full_tensor()
            out[_clean(name)] = t.float().clone()
    return out


def worker(rank: int, world: int, run_dir: str, extra: list[str]) -> dict:
    """One rank: train from config, return losses, norms, parameters and the stage split."""
    del world
    trainer = Trainer(config(run_dir, f"w{rank}", extra))
    hist = trainer.train()
    return {
        "losses": [h.loss for h in hist],
        "norms": [h.grad_norm for h in hist],
        "params": _full_params(trainer),
        "split": getattr(trainer.pipeline, "layer_split", None),
    }


@functools.lru_cache(maxsize=4)
def reference(run_dir: str, model_extra: tuple[str, ...]):
    """Single-process ``(losses, norms, params)`` (cached per model shape)."""
    trainer = Trainer(config(run_dir, "ref", list(model_extra)))
    hist = trainer.train()
    return [h.loss for h in hist], [h.grad_norm for h in hist], _full_params(trainer)


def _assert_params_close(value: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Equal to fp32 rounding after 5 AdamW steps.

    Adam divides by the gradient's magnitude, so an element whose gradient is at rounding level
    (where summing microbatches in another order flips its sign) may move by up to ``lr`` the
    other way. Allow that for a handful of elements; anything systematic (a missed or doubled
    gradient) moves many elements by ~``lr`` and fails.
    """
    assert value.shape == ref.shape, f"{what}: shape {value.shape} != {ref.shape}"
    diff = (value - ref).abs()
    bad = int((diff > 2e-6 + 1e-5 * ref.abs()).sum())
    assert bad <= max(2, ref.numel() // 10_000), (
        f"{what}: {bad}/{ref.numel()} elements differ, max {float(diff.max()):.3g}"
    )
    assert float(diff.max()) < 1e-2, f"{what}: max difference {float(diff.max()):.3g}"


def check(results: list[dict], ref, *, tied: bool = True) -> None:
    """Every rank's losses and norms equal the reference's; every parameter held anywhere
    equals the reference's, and every reference parameter is held by some rank."""
    ref_losses, ref_norms, ref_params = ref
    for r, res in enumerate(results):
        torch.testing.assert_close(
            torch.tensor(res["losses"]),
            torch.tensor(ref_losses),
            rtol=1e-5,
            atol=1e-6,
            msg=lambda m, r=r: f"rank {r} loss: {m}",
        )
        # Step 1's norm is a pure gradient check; later ones also feel Adam's amplification of
        # rounding (single-process grad_accum=4 drifts from grad_accum=1 as much).
        assert abs(res["norms"][0] - ref_norms[0]) <= 1e-5 * ref_norms[0], (r, res["norms"])
        torch.testing.assert_close(
            torch.tensor(res["norms"]),
            torch.tensor(ref_norms),
            rtol=2e-4,
            atol=0,
            msg=lambda m, r=r: f"rank {r} norm: {m}",
        )
    seen = set()
    for r, res in enumerate(results):
        for name, value in res["params"].items():
            ref_name = name
            if tied and name == "output.weight" and "output.weight" not in ref_params:
                ref_name = "tok_embeddings.weight"  # the last stage's copy of the tied matrix
            assert ref_name in ref_params, f"rank {r}: unexpected parameter {name}"
            _assert_params_close(value, ref_params[ref_name], f"rank {r} {name}")
            seen.add(ref_name)
    assert seen == set(ref_params), f"parameters held by no rank: {set(ref_params) - seen}"


def run_case(
    extra: list[str], model_extra: list[str], tmp_factory, *, world: int = WORLD
) -> list[dict]:
    """Train ``extra + model_extra`` on ``world`` ranks, check against the reference, return
    the per-rank results."""
    ref = reference(str(tmp_factory.getbasetemp() / "reference"), tuple(model_extra))
    results = run_ranks(worker, world, str(tmp_factory.mktemp("run")), [*extra, *model_extra])
    check(results, ref)
    return results
