"""Supervised fine-tuning on annotated CoT (the first stage of ReFT / CARFT).

The loop, step by step: build the global batch of step k (a pure function of the seed and k,
so resuming needs only k), run the pipeline schedule with the response-only NLL, take an
optimizer step, log; every ``eval_every`` steps generate greedily on the held-out split;
every ``save_every`` steps (and at the end, and on SIGTERM/SIGUSR1) save a complete
distributed checkpoint. Rerunning the same command resumes from the newest complete one.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from carft_nemo.algorithms.sft import masked_token_nll_sum, shift_for_next_token
from carft_nemo.checkpoint.dist_checkpoint import find_latest_checkpoint, load_checkpoint, save_checkpoint
from carft_nemo.config import require, save_resolved
from carft_nemo.data.datasets import DatasetConfig, load_examples
from carft_nemo.data.tokenization import EncodingConfig, TokenizerConfig, collate_sft, encode_prompts, encode_sft
from carft_nemo.distributed import layout as parallel_layout
from carft_nemo.evaluation.metrics import PairedChange
from carft_nemo.evaluation.runner import EvalResult, baseline_accuracy, evaluate, record_eval
from carft_nemo.generation.config import GenerationConfig
from carft_nemo.models.config import ModelConfig
from carft_nemo.models.logprobs import token_logprobs
from carft_nemo.training.batches import BatchSchedule
from carft_nemo.training.forward_backward import data_parallel_sum, run_forward_backward
from carft_nemo.training.optim import OptimConfig
from carft_nemo.training.preemption import PreemptionHandler
from carft_nemo.training.run_log import LOG, RunLogger, setup_logging
from carft_nemo.training.setup import build_policy, prepare_tokenizer


@dataclass
class SFTLoopConfig:
    steps: int = 300
    global_batch_size: int = 32
    micro_batch_size: int = 8
    eval_every: int = 100  # 0 = only before and after training
    eval_examples: int = 200  # held-out questions per periodic evaluation; 0 = all
    save_every: int = 100  # 0 = only at the end (and on preemption)
    keep_checkpoints: int = 2
    seed: int = 1234
    pad_to_multiple_of: int = 8
    eval_before: bool = True
    vote_k: int = 1

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "global_batch_size",
            "micro_batch_size",
            "keep_checkpoints",
            "pad_to_multiple_of",
            "vote_k",
        ):
            require(getattr(self, name) >= 1, f"train.{name}", f"must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "eval_examples", "save_every"):
            require(getattr(self, name) >= 0, f"train.{name}", f"must be >= 0, got {getattr(self, name)}")
        require(
            self.global_batch_size % self.micro_batch_size == 0,
            "train.global_batch_size",
            f"{self.global_batch_size} is not a multiple of train.micro_batch_size={self.micro_batch_size}",
        )


def _default_eval_data() -> DatasetConfig:
    return DatasetConfig(name="synthetic", split="test")


@dataclass
class SFTConfig:
    """The SFT recipe: ``recipes/sft.py --config configs/sft-*.yaml``."""

    output_dir: str = "outputs/sft"
    init_from_hf: str | None = None  # local HF folder (config.json + safetensors) to start from
    model: ModelConfig = field(default_factory=ModelConfig)  # set model.preset or the fields
    parallel: parallel_layout.ParallelConfig = field(default_factory=parallel_layout.ParallelConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=20, min_lr=1e-4))
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    encoding: EncodingConfig = field(
        default_factory=lambda: EncodingConfig(max_prompt_tokens=128, max_total_tokens=256)
    )
    train_data: DatasetConfig = field(default_factory=DatasetConfig)
    eval_data: DatasetConfig = field(default_factory=_default_eval_data)
    generation: GenerationConfig = field(
        default_factory=lambda: GenerationConfig(max_new_tokens=96, greedy=True, micro_batch_size=64)
    )
    train: SFTLoopConfig = field(default_factory=SFTLoopConfig)

    def __post_init__(self) -> None:
        require(bool(self.output_dir), "output_dir", "must be set")
        require(self.train_data.split == "train", "train_data.split", "must be 'train'")


def check_world_layout(cfg: SFTConfig, world_size: int) -> int:
    """Validate the layout against the world size before anything starts; returns DP size."""
    require(not cfg.model.is_unset, "model.preset", "set model.preset (e.g. tiny) or the architecture fields")
    dp = parallel_layout.check_model_layout(cfg.parallel, world_size, cfg.model)
    require(
        cfg.train.global_batch_size % (cfg.train.micro_batch_size * dp) == 0,
        "train.global_batch_size",
        f"{cfg.train.global_batch_size} must be a multiple of micro_batch_size*data_parallel = "
        f"{cfg.train.micro_batch_size}*{dp}",
    )
    return dp


def _sft_loss(vocab_size: int):
    def loss(logits: torch.Tensor, micro: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logp = token_logprobs(logits, micro["labels"], vocab_size=vocab_size)
        return masked_token_nll_sum(logp, micro["loss_mask"]), {"tokens": micro["loss_mask"].sum()}

    return loss


def run_sft(cfg: SFTConfig) -> dict[str, Any]:
    """Train (or resume) SFT as configured; returns the final summary (same on every rank)."""
    out = Path(cfg.output_dir)
    started = time.perf_counter()
    check_world_layout(cfg, parallel_layout.current_world_size())  # before any process group starts
    layout = parallel_layout.initialize(
        cfg.parallel,
        seed=cfg.train.seed,
        num_layers=cfg.model.num_layers,
        num_attention_heads=cfg.model.num_attention_heads,
        num_query_groups=cfg.model.num_query_groups,
    )
    setup_logging(layout.is_logging_rank)
    if layout.is_logging_rank:
        save_resolved(cfg, out / "config.yaml")

    train_examples = load_examples(cfg.train_data)
    eval_examples = load_examples(cfg.eval_data)
    if cfg.train.eval_examples:
        eval_examples = eval_examples[: cfg.train.eval_examples]
    tokenizer = prepare_tokenizer(cfg.tokenizer, train_examples, out / "tokenizer")
    encoded, trunc = encode_sft(train_examples, tokenizer, cfg.encoding)
    eval_prompts, _, _ = encode_prompts(eval_examples, tokenizer, cfg.encoding)
    LOG.info(
        "data: %d train sequences (%d responses truncated, %d dropped), %d eval questions",
        len(encoded),
        trunc.responses_truncated,
        trunc.dropped,
        len(eval_examples),
    )

    model_cfg = cfg.model.with_vocab(len(tokenizer)) if not cfg.model.vocab_size else cfg.model
    policy = build_policy(model_cfg, cfg.parallel, cfg.optim, cfg.train.steps, init_from_hf=cfg.init_from_hf)
    gen_cfg = dataclasses.replace(
        cfg.generation, eos_token_ids=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id
    )
    generator = policy.generator(len(tokenizer))
    ckpt_dir = out / "checkpoints"
    start_step = 0
    latest = find_latest_checkpoint(ckpt_dir)
    if latest is not None:
        start_step = load_checkpoint(latest, {"policy": policy.trainable}).step
        LOG.info("resumed from %s (step %d)", latest, start_step)
    schedule = BatchSchedule(len(encoded), cfg.train.global_batch_size, seed=cfg.train.seed)
    logger = RunLogger(out, "sft", enabled=layout.is_logging_rank, total_steps=cfg.train.steps, start_step=start_step)

    def run_eval(step: int, name: str) -> tuple[EvalResult, PairedChange | None]:
        t0 = time.perf_counter()
        result = evaluate(generator, tokenizer, eval_examples, eval_prompts, gen_cfg, vote_k=cfg.train.vote_k)
        change = record_eval(
            result, out / "eval", name, step, logger, time.perf_counter() - t0, is_logging_rank=layout.is_logging_rank
        )
        return result, change

    def save(step: int) -> None:
        save_checkpoint(
            ckpt_dir,
            step,
            {"policy": policy.trainable},
            data_state={"step": step},
            metadata={"stage": "sft", "model": dataclasses.asdict(model_cfg)},
            keep_last=cfg.train.keep_checkpoints,
        )

    if cfg.train.eval_before and start_step == 0:
        run_eval(start_step, "before")
    preemption = PreemptionHandler()
    step = start_step
    stopped_early = False
    try:
        while step < cfg.train.steps:
            t0 = time.perf_counter()
            rows = [encoded[i] for i in schedule.rank_indices(step, layout.dp_rank, layout.data_parallel)]
            batch = collate_sft(rows, tokenizer.pad_token_id, cfg.train.pad_to_multiple_of)
            inputs, labels, loss_mask = shift_for_next_token(batch["tokens"], batch["loss_mask"])
            normalizer = data_parallel_sum(loss_mask.sum())
            policy.trainable.model.train()
            policy.trainable.zero_grad()
            metrics = run_forward_backward(
                policy.trainable.model,
                {"tokens": inputs, "labels": labels, "loss_mask": loss_mask},
                loss_fn=_sft_loss(len(tokenizer)),
                normalizer=normalizer,
                micro_batch_size=cfg.train.micro_batch_size,
            )
            ok, grad_norm = policy.trainable.step()
            step += 1
            logger.log(
                step,
                {
                    "loss": metrics["loss"],
                    "lr": policy.trainable.lr,
                    "grad_norm": grad_norm,
                    "update_ok": float(ok),
                    "epoch": schedule.epoch_of(step),
                    "step_time_s": time.perf_counter() - t0,
                },
            )
            logger.advance()
            last = step == cfg.train.steps
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and not last:
                run_eval(step, f"step_{step}")
            saved = last or (cfg.train.save_every and step % cfg.train.save_every == 0)
            if saved:
                save(step)
            if not last and preemption.should_stop():
                LOG.warning("stop signal %s: saving at step %d and exiting", preemption.received, step)
                if not saved:
                    save(step)
                stopped_early = True
                break
    finally:
        preemption.restore()
    after, change = (None, None) if stopped_early else run_eval(step, "final")
    logger.close()
    summary = {
        "steps": step,
        "stopped_early": stopped_early,
        "final_checkpoint": str(ckpt_dir),
        "accuracy_before": baseline_accuracy(out / "eval") if layout.is_logging_rank else None,
        "accuracy_after": after.accuracy if after else None,
        "held_out_change": change.as_dict() if change else None,
        "tokenizer": str(out / "tokenizer"),
        "vocab_size": len(tokenizer),
        "wall_time_s": time.perf_counter() - started,
    }
    if layout.is_logging_rank:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
