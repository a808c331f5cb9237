"""The trainer: ``train()`` -> ``train_step()`` -> ``forward_backward_step()``.

The loss of every micro-batch is a token sum divided by the global number of target tokens of
the step (over all data-parallel ranks and accumulation steps), so gradient accumulation, data
parallelism and sequence parallelism all produce the single-device gradient exactly.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from dist import (
    ParallelDims,
    get_rng_state,
    init_distributed,
    read_dist_env,
    set_rng_state,
    set_seed,
    setup_logging,
)
from dist.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from launch.config import Config, ConfigError, validate
from launch.data import IGNORE_INDEX, Batch, BatchIterator, build_dataset
from launch.metrics import (
    MetricsWriter,
    model_flops_per_token,
    peak_flops,
    peak_memory_gb,
)
from models.llama import LinearLlama
from parallel.data_parallel import allreduce_gradients, clip_grad_norm_, reduce_dtype_of
from parallel.ddp import apply_ddp
from parallel.parallelize import parallelize_model

__all__ = ["StepResult", "Trainer", "build_optimizer", "lr_lambda"]


def lr_lambda(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine down to ``min_ratio`` at ``total`` (multiplier)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(params: list[nn.Parameter], cfg: Config, *, fused: bool) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms, biases or gate scalars)."""
    t = cfg.training
    decay = [p for p in params if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in params if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": t.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8, fused=fused or None
    )


@dataclass
class StepResult:
    step: int
    loss: float
    grad_norm: float
    lr: float
    tokens: int
    seconds: float
    extra: dict = field(default_factory=dict)


class Trainer:
    """Builds everything a run needs from a :class:`Config` and trains.

    Works single-process, under torchrun and under srun; ``parallel.pp * dp * sp`` must match
    the world size.
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        t = cfg.training
        if t.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("training.device is cuda but no CUDA GPU is visible")
        self.device_type = (
            "cuda"
            if (t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available()))
            else "cpu"
        )
        # Check the degrees against the launcher's world size before any process group exists.
        validate(cfg, world_size=read_dist_env().world_size)
        self.env = init_distributed(device_type=self.device_type)
        self.log = setup_logging(self.env.rank)
        self.rank = self.env.rank
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if self.device_type == "cuda"
            else torch.device("cpu")
        )
        p = cfg.parallel
        self.dims = ParallelDims(pp=p.pp, dp=p.dp, sp=p.sp, world_size=self.env.world_size)
        if self.dims.world_size > 1:
            self.dims.build_mesh(self.device_type)
        coords = self.dims.coords(self.rank)
        self.dp_rank, self.sp_rank, self.pp_rank = coords["dp"], coords["sp"], coords["pp"]
        if t.dtype == "bf16" and self.device_type == "cpu":
            self.log.warning("training.dtype bf16 on CPU: autocast to bf16 is slow there")
        self.autocast_dtype = (
            torch.bfloat16
            if (t.dtype == "bf16" or (t.dtype == "auto" and self.device_type == "cuda"))
            else None
        )

        set_seed(t.seed)
        self.model_args = cfg.model_args()
        self.dataset = build_dataset(
            cfg.data, seq_len=t.seq_len, seed=t.seed, vocab_size=self.model_args.vocab_size
        )
        with torch.device(self.device):
            model = LinearLlama(self.model_args)
        self.num_params = sum(q.numel() for q in model.parameters())
        self.pipeline = None
        self._ddp = None
        self._reduce_dtype = reduce_dtype_of(p.grad_reduce_dtype)
        if self.dims.pp_enabled:
            from parallel.pipeline import build_pipeline

            self.pipeline = build_pipeline(
                model, self.dims, cfg, device=self.device, autocast_dtype=self.autocast_dtype
            )
            self.model_parts = self.pipeline.model_parts
        else:
            parallelize_model(
                model,
                self.dims,
                layout=p.layout,
                activation_checkpointing=p.activation_checkpointing,
                checkpoint_every=p.checkpoint_every,
                lasp2_schedule=p.lasp2_schedule,
                fsdp=p.fsdp,
                fsdp_reshard_after_forward=p.fsdp_reshard_after_forward,
                grad_reduce_dtype=p.grad_reduce_dtype,
                compile=t.compile,
            )
            self.model_parts = [model]
            if self.dims.world_size > 1 and not p.fsdp and self.dims.dp * self.dims.sp > 1:
                # Sum the replicas' gradients during the backward (bucketed, overlapped).
                self._ddp = apply_ddp(
                    model, self.dims.group("dp_sp"), reduce_dtype=self._reduce_dtype
                )
        # Once each: a pipeline stage may list a parameter another stage owns (a shared head).
        self.params = list(dict.fromkeys(q for m in self.model_parts for q in m.parameters()))
        self.optimizer = build_optimizer(self.params, cfg, fused=self.device_type == "cuda")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_lambda(s, warmup=t.warmup_steps, total=t.steps, min_ratio=t.min_lr_ratio),
        )
        self.data = BatchIterator(
            self.dataset,
            global_batch=t.batch_size // t.grad_accum,
            dp_rank=self.dp_rank,
            dp_size=self.dims.dp,
            seed=t.seed,
        )
        self.step = 0
        self.metrics = MetricsWriter(cfg.run_path() / "metrics.jsonl" if self.rank == 0 else None)
        self.peak_flops = peak_flops(self.device)
        self.flops_per_token = model_flops_per_token(self.num_params)
        self.history: list[StepResult] = []
        if cfg.checkpoint.enabled and cfg.checkpoint.resume == "auto":
            self.maybe_resume()

    # ------------------------------------------------------------------ helpers
    def _group(self, name: str):
        return self.dims.group(name) if self.dims.world_size > 1 else None

    def _all_reduce(self, x: torch.Tensor, name: str) -> torch.Tensor:
        group = self._group(name)
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(x, group=group)
        return x

    def _shard(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """This SP rank's part of the batch and its global position ids."""
        inputs = batch.inputs.to(self.device, non_blocking=True)
        labels = batch.labels.to(self.device, non_blocking=True)
        if not self.dims.sp_enabled:
            return inputs, labels, None
        from parallel.sequence_shard import shard_position_ids, shard_sequence

        kw = {"rank": self.sp_rank, "world": self.dims.sp, "layout": self.cfg.parallel.layout}
        pos = shard_position_ids(inputs.shape[1], **kw).to(self.device)
        return shard_sequence(inputs, dim=1, **kw), shard_sequence(labels, dim=1, **kw), pos

    # ------------------------------------------------------------------ checkpoints
    def trainer_state(self) -> dict:
        return {
            "step": self.step,
            "scheduler": self.scheduler.state_dict(),
            "data": self.data.state_dict(),
            "rng": get_rng_state(),
        }

    def save(self) -> None:
        root = self.cfg.checkpoint_dir()
        path = save_checkpoint(
            root,
            self.step,
            self._ckpt_module(),
            self.optimizer,
            self.trainer_state(),
            keep_last=self.cfg.checkpoint.keep_last,
        )
        self.log.info("saved checkpoint %s", path)

    def _ckpt_module(self) -> nn.Module:
        if len(self.model_parts) == 1:
            return self.model_parts[0]
        return nn.ModuleList(self.model_parts)

    def maybe_resume(self) -> bool:
        path = latest_checkpoint(self.cfg.checkpoint_dir())
        if path is None:
            return False
        state = load_checkpoint(path, self._ckpt_module(), self.optimizer)
        self.step = int(state["step"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.data.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        self.log.info("resumed from %s at step %d", path, self.step)
        return True

    # ------------------------------------------------------------------ steps
    def forward_backward_step(
        self, batch: Batch, global_tokens: torch.Tensor, *, sync_grads: bool = True
    ) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns its loss sum / global tokens.

        ``sync_grads=False`` (all but the last micro-batch of a step) skips the overlapped
        gradient sum; the last one reduces what all of them accumulated.
        """
        if self.pipeline is not None:
            return self.pipeline.step(batch, global_tokens)
        model = self.model_parts[0]
        inputs, labels, pos = self._shard(batch)
        fwd = self._ddp if self._ddp is not None else model
        no_sync = self._ddp.no_sync() if self._ddp is not None and not sync_grads else nullcontext()
        with no_sync:
            with torch.autocast(
                self.device_type,
                dtype=self.autocast_dtype,
                enabled=self.autocast_dtype is not None,
            ):
                hidden = fwd(inputs, position_ids=pos)
                loss = model.loss(hidden, labels) / global_tokens
            loss.backward()
        return loss.detach()

    def train_step(self) -> StepResult:
        t0 = time.perf_counter()
        t = self.cfg.training
        micro = [self.data.next_batch() for _ in range(t.grad_accum)]
        local = sum(int((b.labels != IGNORE_INDEX).sum()) for b in micro)
        global_tokens = self._all_reduce(torch.tensor(float(local), device=self.device), "dp")
        global_tokens = global_tokens.clamp(min=1.0)
        loss = torch.zeros((), device=self.device)
        for i, b in enumerate(micro):
            loss += self.forward_backward_step(b, global_tokens, sync_grads=i == len(micro) - 1)
        if self.pipeline is not None:  # tied embedding: first and last stage hold a copy each
            self.pipeline.sync_tied_gradients()
        if not self.cfg.parallel.fsdp and self._ddp is None:
            allreduce_gradients(self.params, self._group("dp_sp"), reduce_dtype=self._reduce_dtype)
        norm = clip_grad_norm_(
            self.params, t.grad_clip, pp_group=self._group("pp") if self.dims.pp_enabled else None
        )
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        # Every rank's loss piece is already divided by the global count: sum them all.
        self._all_reduce(loss, "dp_sp")
        if self.dims.pp_enabled:
            self._all_reduce(loss, "pp")
        if self.device_type == "cuda":
            torch.cuda.synchronize()
        # Throughput counts every input token; the loss is averaged over the target tokens
        # (all of them for text, only the answers for MQAR).
        return StepResult(
            self.step,
            float(loss),
            float(norm),
            lr,
            t.batch_size * t.seq_len,
            time.perf_counter() - t0,
            {"target_tokens": int(global_tokens.item())},
        )

    def train(self, *, stop_at: int | None = None) -> list[StepResult]:
        """Train to ``training.steps`` (or stop early at ``stop_at``, for tests)."""
        t = self.cfg.training
        end = t.steps if stop_at is None else min(stop_at, t.steps)
        ck = self.cfg.checkpoint
        bar = None
        if self.rank == 0 and self.cfg.logging.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=end, initial=self.step, desc="train", dynamic_ncols=True)
        self.log.info(
            "model %.1fM params, world %d (pp %d, dp %d, sp %d), device %s, %s",
            self.num_params / 1e6,
            self.dims.world_size,
            self.dims.pp,
            self.dims.dp,
            self.dims.sp,
            self.device,
            self.autocast_dtype or "fp32",
        )
        for model in self.model_parts:
            model.train()
        while self.step < end:
            r = self.train_step()
            self.history.append(r)
            tps = r.tokens / r.seconds
            mfu = (
                self.flops_per_token * tps / (self.peak_flops * self.dims.world_size)
                if self.peak_flops
                else None
            )
            mem = peak_memory_gb(self.device)
            if r.step % self.cfg.logging.log_every == 0 or r.step == end:
                self.metrics.write(
                    {
                        "step": r.step,
                        "loss": r.loss,
                        "grad_norm": r.grad_norm,
                        "lr": r.lr,
                        "tokens": r.tokens,
                        "seconds": r.seconds,
                        "tokens_per_s": tps,
                        "mfu": mfu,
                        "peak_mem_gb": mem,
                    }
                )
            if bar is not None:
                post = {"loss": f"{r.loss:.3f}", "tok/s": f"{tps:,.0f}", "mem": f"{mem:.1f}GB"}
                if mfu is not None:
                    post["mfu"] = f"{mfu:.2f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            if not math.isfinite(r.loss):
                raise FloatingPointError(f"loss became {r.loss} at step {r.step}")
            if ck.enabled and ck.interval and r.step % ck.interval == 0 and r.step < t.steps:
                self.save()
        if bar is not None:
            bar.close()
        if ck.enabled and self.history and self.step == t.steps:
            self.save()
        return self.history
