"""Megatron DDP + optimizer + LR schedule for one model group (policy, critic, SFT).

Wraps megatron-core's DistributedDataParallel, ``get_megatron_optimizer`` (Adam, optional
distributed optimizer, grad clipping, bf16 master weights on GPU) and
``OptimizerParamScheduler`` (warm-up then constant / cosine / linear decay).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from carft_nemo.config import require
from carft_nemo.distributed import cpu_compat, device
from carft_nemo.distributed.layout import ParallelConfig
from carft_nemo.models.config import ModelConfig

LR_SCHEDULES = ("constant", "cosine", "linear")


@dataclass
class OptimConfig:
    """Adam with warm-up + decay. The paper's RL stages use a constant 3e-7."""

    lr: float = 1e-5
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0  # optimizer steps (RL makes several a round: RLLoopConfig.optimizer_steps)
    decay_steps: int = 0  # 0 = the run's total optimizer steps
    schedule: str = "cosine"

    def __post_init__(self) -> None:
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(0 <= self.min_lr <= self.lr, "min_lr", f"must be in [0, lr], got {self.min_lr}")
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "adam_beta1", "betas must be in [0, 1)")
        require(self.clip_grad >= 0, "clip_grad", "must be >= 0 (0 disables clipping)")
        require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        require(self.decay_steps >= 0, "decay_steps", "must be >= 0")
        require(self.schedule in LR_SCHEDULES, "schedule", f"must be one of {LR_SCHEDULES}, got {self.schedule!r}")


@dataclass
class TrainableModel:
    """A model group's trainable state on this rank: what checkpoints save and restore."""

    model: DistributedDataParallel
    optimizer: Any  # megatron MegatronOptimizer
    scheduler: OptimizerParamScheduler

    def zero_grad(self) -> None:
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()

    def step(self, lr_scale: float = 1.0) -> tuple[bool, float]:
        """Optimizer step at ``lr_scale`` x the scheduled LR, then the LR schedule's step;
        returns (update applied, grad norm). The scale lives with the caller (RL's collapse
        guard), so a checkpoint's schedule state stays the schedule's own."""
        scheduled = [group["lr"] for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["lr"] *= lr_scale
        with cpu_compat.cuda_as_cpu_context():
            ok, grad_norm, _ = self.optimizer.step()
        for group, lr in zip(self.optimizer.param_groups, scheduled):
            group["lr"] = lr
        if ok:
            self.scheduler.step(increment=1)
        return bool(ok), float(grad_norm) if grad_norm is not None else 0.0

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


def _offload_settings(fraction: float) -> dict[str, Any]:
    """megatron-core's optimizer offload: ``fraction`` of the shard's Adam state and step on the host.

    Its hybrid optimizer keeps the fp32 master weights of the offloaded parameters in host
    memory and overlaps the gradients' copy out and the weights' copy back with the Adam step;
    it runs only on Transformer Engine's precision-aware Adam (validate_layout checks that).
    """
    if not fraction:
        return {}
    return {
        "optimizer_cpu_offload": True,
        "optimizer_offload_fraction": fraction,
        "use_precision_aware_optimizer": True,
        "overlap_cpu_optimizer_d2h_h2d": True,
    }


def make_trainable(
    gpt: torch.nn.Module, model_cfg: ModelConfig, parallel: ParallelConfig, optim: OptimConfig, total_steps: int
) -> TrainableModel:
    """Wrap a freshly built model in megatron DDP and give it an optimizer and LR schedule."""
    bf16 = device.default_dtype(model_cfg.bf16) == torch.bfloat16
    config = gpt.config
    with cpu_compat.cuda_as_cpu_context():  # DDP buffers / optimizer scalars are made on "cuda"
        ddp = DistributedDataParallel(
            config,
            DistributedDataParallelConfig(
                grad_reduce_in_fp32=True,
                overlap_grad_reduce=False,
                use_distributed_optimizer=parallel.use_distributed_optimizer,
            ),
            gpt,
        )
        optimizer = get_megatron_optimizer(
            MegatronOptimizerConfig(
                optimizer="adam",
                lr=optim.lr,
                min_lr=optim.min_lr,
                weight_decay=optim.weight_decay,
                adam_beta1=optim.adam_beta1,
                adam_beta2=optim.adam_beta2,
                adam_eps=optim.adam_eps,
                clip_grad=optim.clip_grad,
                bf16=bf16,
                fp16=False,
                params_dtype=torch.bfloat16 if bf16 else torch.float32,
                use_distributed_optimizer=parallel.use_distributed_optimizer,
                **_offload_settings(parallel.optimizer_offload_fraction),
            ),
            [ddp],
        )
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    decay = optim.decay_steps or max(total_steps, 1)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if optim.warmup_steps else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_steps,
        lr_decay_steps=max(decay, optim.warmup_steps + 1),
        lr_decay_style=optim.schedule,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=max(decay, 1),
        wd_incr_style="constant",
    )
    return TrainableModel(ddp, optimizer, scheduler)
