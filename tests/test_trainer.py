"""Training end to end on CPU: the loss falls, resumption is exact, 2-process gloo matches."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from launch.config import load_config
from launch.trainer import Trainer, lr_lambda
from tests.conftest import ROOT
from tests.dist_harness import run_ranks

FAST = [
    "model.dim=64",
    "model.ffn_dim=128",
    "model.n_heads=2",
    "training.seq_len=64",
    "training.batch_size=4",
    "data.max_files=30",
    "logging.progress=false",
    "training.warmup_steps=3",
]


def make(tmp_path, *extra, name="run"):
    cfg = load_config(None, [*FAST, f"logging.run_dir={tmp_path}", f"logging.name={name}", *extra])
    return Trainer(cfg)


def test_lr_schedule_shape():
    lrs = [lr_lambda(s, warmup=10, total=100, min_ratio=0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


@pytest.mark.timeout(300)
def test_thirty_steps_lower_the_loss(tmp_path):
    tr = make(tmp_path, "training.steps=30", "checkpoint.enabled=false")
    hist = tr.train()
    first = sum(h.loss for h in hist[:3]) / 3
    last = sum(h.loss for h in hist[-3:]) / 3
    assert last < first - 1.0, (first, last)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    rec = json.loads(lines[-1])
    assert rec["step"] == 30 and rec["tokens_per_s"] > 0 and "peak_mem_gb" in rec


@pytest.mark.timeout(300)
def test_resume_gives_identical_losses(tmp_path):
    ref = make(tmp_path, "training.steps=12", "checkpoint.enabled=false", name="ref").train()
    a = make(tmp_path, "training.steps=12", "checkpoint.interval=5", name="cut")
    first = a.train(stop_at=7)  # checkpoints at step 5, then "crashes" at step 7
    assert [h.loss for h in first] == [h.loss for h in ref[:7]]
    b = make(tmp_path, "training.steps=12", "checkpoint.interval=5", name="cut")
    assert b.step == 5
    rest = b.train()
    assert [h.step for h in rest] == list(range(6, 13))
    torch.testing.assert_close(
        torch.tensor([h.loss for h in rest]),
        torch.tensor([h.loss for h in ref[5:]]),
        rtol=0,
        atol=0,
    )
    ckpts = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir())
    assert ckpts == ["step_00000010", "step_00000012"]  # keep_last = 2, no .tmp leftovers


def test_grad_accum_matches_one_big_batch(tmp_path):
    a = make(tmp_path, "training.steps=3", "checkpoint.enabled=false", name="a").train()
    b = make(
        tmp_path, "training.steps=3", "checkpoint.enabled=false", "training.grad_accum=2", name="b"
    ).train()
    torch.testing.assert_close(
        torch.tensor([h.loss for h in a]), torch.tensor([h.loss for h in b]), rtol=1e-5, atol=1e-6
    )


def _dp_worker(rank, world, run_dir):
    cfg = load_config(
        None,
        [
            *FAST,
            "training.steps=4",
            "checkpoint.enabled=false",
            f"logging.run_dir={run_dir}",
            "logging.name=dp",
        ],
    )
    tr = Trainer(cfg)
    hist = tr.train()
    return [h.loss for h in hist], {
        k: v.detach().clone() for k, v in tr.model_parts[0].state_dict().items()
    }


@pytest.mark.timeout(300)
def test_two_process_gloo_matches_single_process(tmp_path):
    single = make(tmp_path, "training.steps=4", "checkpoint.enabled=false", name="one")
    ref = [h.loss for h in single.train()]
    ref_state = single.model_parts[0].state_dict()
    results = run_ranks(_dp_worker, 2, str(tmp_path))
    for losses, state in results:
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), rtol=1e-5, atol=1e-6)
        for k, v in ref_state.items():
            torch.testing.assert_close(state[k], v, rtol=1e-4, atol=1e-5)


@pytest.mark.timeout(300)
def test_cli_trains_from_a_fresh_process(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.cli",
            "train",
            *sum((["--set", s] for s in FAST), []),
            "--set",
            "training.steps=3",
            "--set",
            f"logging.run_dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr
    assert "trained 3 steps" in r.stdout
    assert (tmp_path / "default" / "checkpoints" / "step_00000003" / ".complete").is_file()


def test_finished_run_is_left_alone(tmp_path):
    make(tmp_path, "training.steps=2", name="done").train()
    ck = tmp_path / "done" / "checkpoints" / "step_00000002"
    stamp = ck.stat().st_mtime_ns
    again = make(tmp_path, "training.steps=2", name="done")
    assert again.step == 2 and again.train() == []
    assert ck.stat().st_mtime_ns == stamp


def _dp_accum_worker(rank, world, run_dir):
    cfg = load_config(
        None,
        [
            *FAST,
            "training.steps=3",
            "training.grad_accum=2",
            "checkpoint.enabled=false",
            f"logging.run_dir={run_dir}",
            "logging.name=dpacc",
        ],
    )
    tr = Trainer(cfg)
    assert tr._ddp is not None  # the overlapped gradient sum is in use
    return [h.loss for h in tr.train()]


@pytest.mark.timeout(300)
def test_two_process_grad_accum_matches_single_process(tmp_path):
    ref = [
        h.loss
        for h in make(tmp_path, "training.steps=3", "checkpoint.enabled=false", name="one").train()
    ]
    for losses in run_ranks(_dp_accum_worker, 2, str(tmp_path)):
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), rtol=1e-5, atol=1e-6)


def test_half_written_checkpoint_is_never_resumed(tmp_path):
    """A crash during a save leaves step_N.tmp (or a step folder without .complete): resume
    takes the last complete checkpoint instead."""
    make(tmp_path, "training.steps=6", "checkpoint.interval=3", name="crash").train(stop_at=4)
    root = tmp_path / "crash" / "checkpoints"
    (root / "step_00000006.tmp").mkdir()
    (root / "step_00000006.tmp" / "__0_0.distcp").write_bytes(b"partial")
    (root / "step_00000005").mkdir()  # no .complete marker
    again = make(tmp_path, "training.steps=6", "checkpoint.interval=3", name="crash")
    assert again.step == 3


def test_files_source_and_mqar_train(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"d{i}.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    hist = make(
        tmp_path,
        "training.steps=2",
        "checkpoint.enabled=false",
        "data.source=files",
        f"data.path={docs}",
        name="files",
    ).train()
    assert len(hist) == 2
    hist = make(
        tmp_path,
        "training.steps=2",
        "checkpoint.enabled=false",
        "data.source=mqar",
        "data.mqar_pairs=4",
        "data.mqar_vocab=16",
        "model.vocab_size=40",
        "model.linear_variant=gated_deltanet",
        name="mqar",
    ).train()
    # 4 sequences per step, 4 answers each: the loss is averaged over exactly those 16.
    assert len(hist) == 2 and all(h.extra["target_tokens"] == 16 for h in hist)


def test_files_source_with_no_match_is_a_config_error(tmp_path):
    from launch.config import ConfigError

    with pytest.raises(ConfigError, match="data.path"):
        make(tmp_path, "data.source=files", f"data.path={tmp_path}/none*.txt")
