"""Config loading: every kind of user mistake ends with a clear message naming the field."""

from __future__ import annotations

import subprocess
import sys

import pytest

from launch.config import Config, ConfigError, load_config, parse_override, validate
from tests.conftest import ROOT


def write(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_defaults_are_valid():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.model.preset == "tiny"
    assert cfg.model_args().n_layers == 4


def test_yaml_and_overrides(tmp_path):
    p = write(tmp_path, "training:\n  steps: 7\n  lr: 1e-3\nparallel:\n  sp: 2\n")
    cfg = load_config(p, ["training.steps=9", "model.layer_pattern=LLN", "parallel.layout=zigzag"])
    assert cfg.training.steps == 9
    assert cfg.training.lr == pytest.approx(1e-3)
    assert cfg.parallel.sp == 2
    assert cfg.model_args().layer_pattern == "LLN"
    assert cfg.parallel.layout == "zigzag"


@pytest.mark.parametrize(
    "text, field",
    [
        ("training:\n  stepz: 3\n", "training.stepz"),
        ("trainng:\n  steps: 3\n", "trainng"),
        ("training:\n  steps: three\n", "training.steps"),
        ("training:\n  steps: 2.5\n", "training.steps"),
        ("training:\n  steps: 0\n", "training.steps"),
        ("training:\n  lr: -1\n", "training.lr"),
        ("training:\n  dtype: fp8\n", "training.dtype"),
        ("parallel:\n  layout: spiral\n", "parallel.layout"),
        ("parallel:\n  sp: 3\ntraining:\n  seq_len: 256\n", "training.seq_len"),
        ("parallel:\n  sp: 2\n  layout: zigzag\ntraining:\n  seq_len: 6\n", "training.seq_len"),
        ("parallel:\n  pp_schedule: Magic\n", "parallel.pp_schedule"),
        ("model:\n  preset: huge\n", "model.preset"),
        ("model:\n  n_heads: 3\n", "model.dim"),
        ("model:\n  n_kv_heads: 3\n", "model.n_heads"),
        ("model:\n  layer_pattern: LXN\n", "model.layer_pattern"),
        ("model:\n  linear_variant: mamba\n", "model.linear_variant"),
        ("model:\n  tie_embeddings: maybe\n", "model.tie_embeddings"),
        ("data:\n  source: megatron\n", "data.path"),
        ("offload:\n  optimizer: nvme\n", "offload.optimizer"),
        ("parallel:\n  pp: 8\n", "model.n_layers"),
        ("parallel:\n  grad_reduce_dtype: fp8\n", "parallel.grad_reduce_dtype"),
        ("parallel:\n  pp_zb_max_pending_w: -1\n", "parallel.pp_zb_max_pending_w"),
        ("training:\n  compile: sometimes\n", "training.compile"),
        (
            "training:\n  compile: true\nparallel:\n  pp: 2\n  pp_schedule: ZBVZeroBubble\n"
            "  pp_stages_per_rank: 2\n",
            "training.compile",
        ),
        ("- just\n- a list\n", "mapping"),
    ],
)
def test_bad_config_names_the_field(tmp_path, text, field):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert field in str(e.value)


def test_world_size_consistency():
    cfg = load_config(None, ["parallel.pp=2", "parallel.sp=2", "parallel.dp=2"])
    validate(cfg, world_size=8)
    with pytest.raises(ConfigError, match="does not match the world size 4"):
        validate(cfg, world_size=4)
    cfg = load_config(None, ["parallel.sp=2", "training.batch_size=3"])
    with pytest.raises(ConfigError, match="training.batch_size"):
        validate(cfg, world_size=4)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="section.field=value"):
        parse_override("steps")
    with pytest.raises(ConfigError, match="section.field=value"):
        parse_override("steps=3")
    assert parse_override("training.steps=3") == ("training.steps", 3)
    assert load_config(None, ["training.lr=3e-4"]).training.lr == pytest.approx(3e-4)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "training: [\n"))


def test_cli_exit_code_2_without_traceback(tmp_path):
    p = write(tmp_path, "training:\n  stepz: 3\n")
    r = subprocess.run(
        [sys.executable, "-m", "launch.cli", "train", "--config", str(p)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert "training.stepz" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "launch.cli", "train", "--set", "parallel.sp=3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "parallel" in r.stderr


def test_configs_folder_is_valid():
    files = sorted((ROOT / "configs").glob("*.yaml"))
    assert files, "configs/ should hold example run configs"
    for f in files:
        load_config(f)


def test_dp_rest_message_is_readable():
    cfg = load_config(None, ["parallel.sp=4"])
    with pytest.raises(ConfigError, match=r"parallel.pp \* parallel.sp = 1 \* 4 = 4 must divide"):
        validate(cfg, world_size=2)
