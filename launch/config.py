"""Run configuration: YAML -> validated nested dataclasses, with ``--set a.b=value`` overrides.

Every user mistake raises :class:`ConfigError` (a ValueError) naming the field and what is
allowed; the CLI turns it into one line on stderr and exit code 2, before any work is done.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "LoggingConfig",
    "ModelConfig",
    "OffloadConfig",
    "ParallelConfig",
    "TrainingConfig",
    "load_config",
]


class ConfigError(ValueError):
    """A user configuration mistake; the message names the field."""


@dataclass
class ModelConfig:
    preset: str = "tiny"
    """Named shape from models/presets.py: tiny, linear-llama3-1b, linear-llama3-8b."""
    dim: int | None = None
    """Model width (overrides the preset when set)."""
    n_layers: int | None = None
    """Number of blocks."""
    n_heads: int | None = None
    """Attention heads (linear and softmax)."""
    n_kv_heads: int | None = None
    """Key/value heads of the softmax layers (GQA)."""
    ffn_dim: int | None = None
    """SwiGLU inner width."""
    vocab_size: int | None = None
    """Vocabulary size; must cover the tokenizer's ids."""
    layer_pattern: str | None = None
    """Repeated pattern of L (linear) and N (softmax) layers, e.g. LLLN for a 1/4 hybrid."""
    linear_variant: str | None = None
    """linear, lightning, retention, simple_gla, gla or gated_deltanet."""
    kernel_backend: str | None = None
    """auto (Triton on CUDA, pure torch on CPU), triton or reference."""
    tie_embeddings: bool | None = None
    """Share the embedding and output matrices."""
    loss_chunk_tokens: int | None = None
    """Tokens per chunk of the chunked cross-entropy."""


@dataclass
class ParallelConfig:
    pp: int = 1
    """Pipeline-parallel degree."""
    dp: int = -1
    """Data-parallel degree; -1 = the rest of the world (world / (pp * sp))."""
    sp: int = 1
    """Sequence-parallel degree (LASP-2 / LASP-2H)."""
    layout: Literal["contiguous", "zigzag"] = "contiguous"
    """How a sequence is split over the SP group: contiguous slices, or zigzag (2*sp slices,
    rank r holds r and 2*sp-1-r) to balance causal softmax work in hybrids."""
    lasp2_schedule: Literal["overlap", "serial"] = "serial"
    """LASP-2 for the linear/scalar/GLA layers: serial (AllGather first, then one op call from
    the incoming state: no separate cross term) or overlap (the intra-slice op from a zero state
    runs while the state AllGather flies, then the incoming-state term is added). Serial is the
    default: on 4 x H100 it was 860 ms against 922 ms per step for overlap at 128K over sp = 4
    (benchmarks/README.md), the one-layer AllGather it exposes being ~40 us."""
    pp_schedule: Literal[
        "GPipe", "1F1B", "Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble"
    ] = "1F1B"
    """torch.distributed.pipelining schedule."""
    pp_microbatches: int | None = None
    """Microbatches per step (default: the number of pipeline stages)."""
    pp_stages_per_rank: int = 1
    """Virtual stages per rank (2 for the interleaved and V schedules)."""
    pp_stage_layers: list[int] | None = None
    """Layers of each pipeline stage in stage order (``pp * pp_stages_per_rank`` entries summing
    to ``model.n_layers``; the first and last stage may be empty, the others hold at least one
    layer), e.g. ``[2, 2, 2, 2, 2, 3, 3, 0]``. Null: split by cost so that each rank's work
    balances (parallel/pipeline_split.py)."""
    pp_zb_max_pending_w: int | None = None
    """Zero-bubble schedules with the deferred weight pass (no checkpointing, no FSDP): at
    most this many microbatches' weight gradients wait for their W slot per stage, each holding
    its linear layers' inputs and output gradients; a backward beyond that computes its weight
    gradients at once (less memory, fewer bubbles filled). Null: no bound."""
    fsdp: bool = False
    """Shard parameters, gradients and optimizer state over dp x sp with FSDP2 (each rank steps
    its shard of the optimizer; the gradient sum becomes a reduce-scatter)."""
    fsdp_reshard_after_forward: bool | None = None
    """FSDP2: free each block's gathered parameters after its forward and gather them again for
    its backward (true, least memory), or keep them from forward to backward (false: one
    gather per step; 732 against 740 ms per step at sp = 4 on 4 x H100, benchmarks/README.md).
    Default (null): true without PP, false with it."""
    grad_reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """dtype in which gradients are summed over dp x sp (DDP, the all-reduce after the
    backward, FSDP's reduce-scatter): fp32 (exact to fp32 rounding: parallel runs match one
    device), or bf16 (half the bytes; each rank's gradient is rounded to bf16 before the sum,
    which is also done in bf16, then kept in fp32 for the optimizer). The tied embedding's two
    pipeline copies are always summed in fp32."""
    activation_checkpointing: Literal["none", "full", "partial"] = "none"
    """Recompute blocks in the backward instead of keeping their activations: every block
    (full) or one in checkpoint_every (partial: memory and recompute both scale down)."""
    checkpoint_every: int = 2
    """partial checkpointing: recompute one block in this many."""


@dataclass
class TrainingConfig:
    steps: int = 200
    """Optimizer steps."""
    batch_size: int = 16
    """Sequences per optimizer step, over all data-parallel ranks (global batch)."""
    grad_accum: int = 1
    """Micro-steps per optimizer step (batch_size must divide by dp * grad_accum)."""
    seq_len: int = 512
    """Tokens per sequence (the whole sequence, before SP splits it)."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak (cosine decay)."""
    warmup_steps: int = 20
    """Linear warm-up steps."""
    weight_decay: float = 0.1
    """AdamW weight decay (matrices only)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 disables clipping)."""
    seed: int = 0
    """Seed for weights, data order and dropout-free randomness."""
    compile: bool = False
    """torch.compile every block (after checkpointing, before FSDP); the linear-attention
    kernels and the SP collectives stay outside the compiled graphs."""
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """Compute dtype: auto = bf16 autocast on CUDA, fp32 on CPU."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train."""


@dataclass
class DataConfig:
    source: Literal["stdlib", "megatron", "mqar", "files"] = "stdlib"
    """stdlib: the Python standard library's own source (always present); megatron: a
    Megatron .bin/.idx prefix; mqar: synthetic associative recall; files: text files."""
    path: str | None = None
    """megatron: the data prefix (without .bin/.idx); files: a file, directory or glob."""
    tokenizer: str = "byte"
    """byte (no download, vocab 256) or the path of a Hugging Face tokenizer.json."""
    max_files: int = 400
    """stdlib/files: at most this many source files (sorted, deterministic)."""
    mqar_pairs: int = 16
    """mqar: key-value pairs per sequence."""
    mqar_vocab: int = 128
    """mqar: size of the key and value alphabets."""


@dataclass
class CheckpointConfig:
    dir: str | None = None
    """Checkpoint folder; default <logging.run_dir>/<logging.name>/checkpoints."""
    interval: int = 0
    """Save every N steps (0: only at the end); the last step is always saved."""
    resume: Literal["auto", "never"] = "auto"
    """auto: continue from the latest checkpoint in dir when there is one."""
    keep_last: int = 2
    """How many step folders to keep."""
    enabled: bool = True
    """Write checkpoints at all."""


@dataclass
class OffloadConfig:
    optimizer: Literal["none"] = "none"
    """Optimizer-state offloading (CPU/CXL tiers): not in this release."""
    activations: Literal["none"] = "none"
    """Activation offloading (CPU/SSD): not in this release."""


@dataclass
class LoggingConfig:
    run_dir: str = "runs"
    """Parent folder of runs."""
    name: str = "default"
    """Run name: metrics go to <run_dir>/<name>/metrics.jsonl."""
    log_every: int = 1
    """Steps between metric records."""
    progress: bool = True
    """Show a progress bar on rank 0."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def model_args(self):
        """The :class:`models.llama.ModelArgs` this config asks for (validated)."""
        from models.presets import get_preset

        overrides = {
            k: v
            for k, v in dataclasses.asdict(self.model).items()
            if k != "preset" and v is not None
        }
        try:
            args = get_preset(self.model.preset, **overrides)
            args.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return args

    def checkpoint_dir(self) -> Path:
        if self.checkpoint.dir:
            return Path(self.checkpoint.dir)
        return Path(self.logging.run_dir) / self.logging.name / "checkpoints"

    def run_path(self) -> Path:
        return Path(self.logging.run_dir) / self.logging.name


# ---------------------------------------------------------------- building from dicts


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{where}: must be {_type_name(tp)}, got {value!r}")
    if origin is list:
        if isinstance(value, list):
            (item,) = typing.get_args(tp)
            return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads 1e-3 as a string; accept what float() reads.
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown field {prefix}{unknown[0]}; allowed fields of {where or 'the config'}: "
            f"{', '.join(names)}"
        )
    kwargs = {}
    for name in names:
        if name in data:
            path = f"{where}.{name}" if where else name
            kwargs[name] = _coerce(data[name], hints[name], path)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {p} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"training.steps=50"`` -> ``("training.steps", 50)`` (the value read as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set expects section.field=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or key.count(".") != 1:
        raise ConfigError(f"--set expects section.field=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (or the defaults when None), apply ``--set`` overrides, validate."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections")
        tree = loaded or {}
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    cfg = _build(Config, tree, "")
    validate(cfg)
    return cfg


def validate(cfg: Config, *, world_size: int | None = None) -> None:
    """Check values and their consistency; with ``world_size``, also the parallel degrees."""
    t, p, d = cfg.training, cfg.parallel, cfg.data
    for name in ("steps", "batch_size", "grad_accum", "seq_len"):
        if getattr(t, name) < 1:
            raise ConfigError(f"training.{name} must be >= 1, got {getattr(t, name)}")
    if t.warmup_steps < 0:
        raise ConfigError(f"training.warmup_steps must be >= 0, got {t.warmup_steps}")
    if not t.lr > 0:
        raise ConfigError(f"training.lr must be > 0, got {t.lr}")
    if not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError(f"training.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    if t.grad_clip < 0:
        raise ConfigError(f"training.grad_clip must be >= 0 (0 disables), got {t.grad_clip}")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(t, name) < 1:
            raise ConfigError(f"training.{name} must be in [0, 1), got {getattr(t, name)}")
    for name in ("pp", "sp", "pp_stages_per_rank", "checkpoint_every"):
        if getattr(p, name) < 1:
            raise ConfigError(f"parallel.{name} must be >= 1, got {getattr(p, name)}")
    if p.dp < 1 and p.dp != -1:
        raise ConfigError(f"parallel.dp must be >= 1 or -1 (the rest), got {p.dp}")
    if p.pp_microbatches is not None and p.pp_microbatches < 1:
        raise ConfigError(f"parallel.pp_microbatches must be >= 1, got {p.pp_microbatches}")
    if p.pp_zb_max_pending_w is not None and p.pp_zb_max_pending_w < 0:
        raise ConfigError(
            f"parallel.pp_zb_max_pending_w must be >= 0 or null, got {p.pp_zb_max_pending_w}"
        )
    pieces = p.sp * (2 if p.layout == "zigzag" else 1)
    if t.seq_len % pieces:
        raise ConfigError(
            f"training.seq_len ({t.seq_len}) must be divisible by "
            f"{'2 * parallel.sp' if p.layout == 'zigzag' else 'parallel.sp'} = {pieces}"
        )
    if d.source == "megatron" and not d.path:
        raise ConfigError("data.path must name the Megatron prefix when data.source is megatron")
    if d.source == "files" and not d.path:
        raise ConfigError("data.path must name a file, folder or glob when data.source is files")
    if d.max_files < 1 or d.mqar_pairs < 1 or d.mqar_vocab < 2:
        raise ConfigError("data.max_files and data.mqar_pairs must be >= 1, data.mqar_vocab >= 2")
    if cfg.checkpoint.interval < 0 or cfg.checkpoint.keep_last < 1:
        raise ConfigError("checkpoint.interval must be >= 0 and checkpoint.keep_last >= 1")
    if cfg.logging.log_every < 1:
        raise ConfigError(f"logging.log_every must be >= 1, got {cfg.logging.log_every}")
    args = cfg.model_args()
    if p.pp * p.pp_stages_per_rank > args.n_layers:
        raise ConfigError(
            f"model.n_layers ({args.n_layers}) must be >= parallel.pp * "
            f"parallel.pp_stages_per_rank = {p.pp * p.pp_stages_per_rank} (one layer per stage)"
        )
    _validate_pipeline(p)
    _validate_stage_layers(p, args.n_layers)
    if t.compile and p.pp > 1 and p.pp_schedule in ("InterleavedZeroBubble", "ZBVZeroBubble"):
        raise ConfigError(
            f"training.compile cannot run with parallel.pp_schedule {p.pp_schedule}: a compiled "
            "block's backward is one graph, which the zero-bubble schedules' separate input- and "
            "weight-gradient passes cannot split; use 1F1B, GPipe or Interleaved1F1B, or "
            "training.compile=false"
        )
    if world_size is not None:
        from dist.parallel_dims import ParallelDims

        try:  # the one check of the degrees, shared with the runtime
            dp = ParallelDims(pp=p.pp, dp=p.dp, sp=p.sp, world_size=world_size).dp
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if t.batch_size % (dp * t.grad_accum):
            raise ConfigError(
                f"training.batch_size ({t.batch_size}) must be divisible by dp * "
                f"training.grad_accum = {dp} * {t.grad_accum}"
            )
        local = t.batch_size // (dp * t.grad_accum)
        if p.pp > 1 and local % pipeline_microbatches(p):
            raise ConfigError(
                f"parallel.pp_microbatches ({pipeline_microbatches(p)}) must divide the "
                f"sequences per data-parallel rank and micro-step, training.batch_size / (dp * "
                f"training.grad_accum) = {local}"
            )


# Pipeline schedules that run several stages per rank, and how many they need.
_PP_MULTI_STAGE = {
    "Interleaved1F1B": "at least",
    "InterleavedZeroBubble": "at least",
    "ZBVZeroBubble": "exactly",
}
# Schedules that keep stages busy with one forward and one backward in turn: they need at
# least one microbatch per pipeline rank (torch.distributed.pipelining refuses fewer).
_PP_1F1B_LIKE = ("1F1B", "Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble")


def pipeline_microbatches(p: ParallelConfig) -> int:
    """Microbatches per pipeline step: ``parallel.pp_microbatches`` or the number of stages."""
    return p.pp_microbatches or p.pp * p.pp_stages_per_rank


def _validate_stage_layers(p: ParallelConfig, n_layers: int) -> None:
    """An explicit ``parallel.pp_stage_layers``: one entry per stage, the layers all placed."""
    if p.pp_stage_layers is None:
        return
    from parallel.pipeline_split import stage_sizes_problem  # the rule split_layers applies

    problem = stage_sizes_problem(p.pp_stage_layers, p.pp * p.pp_stages_per_rank, n_layers)
    if problem:
        raise ConfigError(f"parallel.pp_stage_layers {p.pp_stage_layers}: {problem}")


def _validate_pipeline(p: ParallelConfig) -> None:
    """Schedule, stages per rank and microbatches that torch.distributed.pipelining can run."""
    if p.pp == 1:
        return
    s, v, m = p.pp_schedule, p.pp_stages_per_rank, pipeline_microbatches(p)
    need = _PP_MULTI_STAGE.get(s)
    if need is None and v != 1:
        raise ConfigError(
            f"parallel.pp_schedule {s} runs one stage per rank, but parallel.pp_stages_per_rank "
            f"is {v}; set it to 1 or use Interleaved1F1B, InterleavedZeroBubble or ZBVZeroBubble"
        )
    if (need == "at least" and v < 2) or (need == "exactly" and v != 2):
        raise ConfigError(
            f"parallel.pp_schedule {s} needs {need} 2 stages per rank: set "
            f"parallel.pp_stages_per_rank to 2 (got {v})"
        )
    if s in _PP_1F1B_LIKE and m < p.pp:
        raise ConfigError(
            f"parallel.pp_microbatches ({m}) must be >= parallel.pp ({p.pp}) for the {s} "
            f"schedule: fewer microbatches than pipeline stages leave ranks idle"
        )
    if need == "at least" and m % p.pp:
        raise ConfigError(
            f"parallel.pp_microbatches ({m}) must be a multiple of parallel.pp ({p.pp}) for "
            f"the {s} schedule"
        )
