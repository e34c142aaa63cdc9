"""Supervised fine-tuning on annotated CoT (the first stage of ReFT / CARFT).

One step: the global batch of step k (a pure function of the seed and k, so resuming needs
only k), megatron's pipeline schedule with the response-only NLL, one optimizer step. The
cadence around it (held-out evaluations, checkpoints, stop signals, the final evaluation)
is :func:`carft_nemo.training.loop.run_loop`'s. Rerunning the same command resumes from the
newest complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from carft_nemo.algorithms.sft import masked_token_nll_sum, shift_for_next_token
from carft_nemo.checkpoint.dist_checkpoint import (
    POLICY_GROUP,
    find_latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from carft_nemo.config import save_resolved
from carft_nemo.data.datasets import load_examples
from carft_nemo.data.tokenization import collate_sft, encode_prompts, encode_sft
from carft_nemo.distributed import layout as parallel_layout
from carft_nemo.evaluation.metrics import PairedChange
from carft_nemo.evaluation.runner import EvalResult, evaluate, held_out_summary, record_eval
from carft_nemo.models.logprobs import token_logprobs
from carft_nemo.planning.plan import check_at_start, plan_sft, running_precision
from carft_nemo.sft.config import SFTConfig, check_world_layout, planning_model
from carft_nemo.sft.setup import build_policy, prepare_tokenizer
from carft_nemo.telemetry.run_log import LOG, RunLogger, setup_logging
from carft_nemo.telemetry.timing import PhaseTimer
from carft_nemo.training.batches import BatchSchedule
from carft_nemo.training.forward_backward import data_parallel_sum, run_forward_backward
from carft_nemo.training.loop import run_loop


def _sft_loss(vocab_size: int):
    """Micro-batch loss: the NLL summed over response tokens (the loop divides by their global count)."""

    def loss(logits: torch.Tensor, micro: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logp = token_logprobs(logits, micro["labels"], vocab_size=vocab_size)
        return masked_token_nll_sum(logp, micro["loss_mask"]), {"tokens": micro["loss_mask"].sum()}

    return loss


class SFTStage:
    """This rank's SFT run: data, policy, and the hooks :func:`run_loop` calls."""

    def __init__(self, cfg: SFTConfig, layout: parallel_layout.ParallelLayout, out: Path) -> None:
        self.cfg, self.layout, self.out = cfg, layout, out
        self.ckpt_dir = out / "checkpoints"
        train_examples = load_examples(cfg.train_data)
        self.eval_examples = load_examples(cfg.eval_data)
        if cfg.train.eval_examples:
            self.eval_examples = self.eval_examples[: cfg.train.eval_examples]
        self.tokenizer = prepare_tokenizer(cfg.tokenizer, train_examples, out / "tokenizer")
        self.encoded, trunc = encode_sft(train_examples, self.tokenizer, cfg.encoding)
        self.eval_prompts, _, _ = encode_prompts(self.eval_examples, self.tokenizer, cfg.encoding)
        LOG.info(
            "data: %d train sequences (%d responses truncated, %d dropped), %d eval questions",
            len(self.encoded),
            trunc.responses_truncated,
            trunc.dropped,
            len(self.eval_examples),
        )
        vocab = len(self.tokenizer)
        self.model_cfg = cfg.model.with_vocab(vocab) if not cfg.model.vocab_size else cfg.model
        self.policy = build_policy(
            self.model_cfg, cfg.parallel, cfg.optim, cfg.train.steps, init_from_hf=cfg.init_from_hf
        )
        self.gen_cfg = dataclasses.replace(
            cfg.generation, eos_token_ids=(self.tokenizer.eos_token_id,), pad_token_id=self.tokenizer.pad_token_id
        )
        self.generator = self.policy.generator(vocab)
        self.loss_fn = _sft_loss(vocab)
        self.schedule = BatchSchedule(len(self.encoded), cfg.train.global_batch_size, seed=cfg.train.seed)
        self.logger: RunLogger | None = None

    def resume(self) -> int:
        """Load the newest complete checkpoint, if any; returns the completed steps."""
        latest = find_latest_checkpoint(self.ckpt_dir)
        if latest is None:
            return 0
        step = load_checkpoint(latest, {POLICY_GROUP: self.policy.trainable}).step
        LOG.info("resumed from %s (step %d)", latest, step)
        return step

    def train_step(self, step: int) -> dict[str, float]:
        timer = PhaseTimer()
        indices = self.schedule.rank_indices(step, self.layout.dp_rank, self.layout.data_parallel)
        batch = collate_sft(
            [self.encoded[i] for i in indices], self.tokenizer.pad_token_id, self.cfg.train.pad_to_multiple_of
        )
        inputs, labels, loss_mask = shift_for_next_token(batch["tokens"], batch["loss_mask"])
        trainable = self.policy.trainable
        trainable.model.train()
        trainable.zero_grad()
        metrics = run_forward_backward(
            trainable.model,
            {"tokens": inputs, "labels": labels, "loss_mask": loss_mask, "lengths": batch["lengths"] - 1},
            loss_fn=self.loss_fn,
            normalizer=data_parallel_sum(loss_mask.sum()),
            micro_batch_size=self.cfg.train.micro_batch_size,
            packing=self.cfg.train.packing,
            sequence_multiple=self.cfg.parallel.sequence_multiple,
        )
        ok, grad_norm = trainable.step()
        return {
            "loss": metrics["loss"],
            "lr": trainable.lr,
            "grad_norm": grad_norm,
            "update_ok": float(ok),
            "epoch": self.schedule.epoch_of(step + 1),
            "step_time_s": timer.elapsed(),
        }

    def evaluate(self, done: int, name: str) -> tuple[EvalResult, PairedChange | None]:
        timer = PhaseTimer()
        result = evaluate(
            self.generator,
            self.tokenizer,
            self.eval_examples,
            self.eval_prompts,
            self.gen_cfg,
            vote_k=self.cfg.train.vote_k,
        )
        elapsed = timer.elapsed()
        change = record_eval(
            result, self.out / "eval", name, done, self.logger, elapsed, is_logging_rank=self.layout.is_logging_rank
        )
        return result, change

    def save(self, done: int) -> None:
        save_checkpoint(  # collective; rank 0 prunes to the newest keep_checkpoints
            self.ckpt_dir,
            done,
            {POLICY_GROUP: self.policy.trainable},
            data_state={"step": done},
            metadata={"stage": "sft", "model": dataclasses.asdict(self.model_cfg)},
            keep_last=self.cfg.train.keep_checkpoints,
        )

    def after_step(self, done: int, metrics: dict[str, float], evaluation: Any, saved: bool) -> None:
        """SFT has no collapse guard: the loop always goes on."""
        return None


def run_sft(cfg: SFTConfig) -> dict[str, Any]:
    """Train (or resume) SFT as configured; returns the final summary (same on every rank)."""
    out = Path(cfg.output_dir)
    timer = PhaseTimer()  # the whole run
    world = parallel_layout.current_world_size()
    check_world_layout(cfg, world)  # before any process group starts
    check_at_start(plan_sft(cfg, planning_model(cfg), running_precision(cfg.model), world), cfg.cluster)
    layout = parallel_layout.initialize(cfg.parallel, seed=cfg.train.seed, **cfg.model.layout_dims)
    setup_logging(layout.is_logging_rank)
    if layout.is_logging_rank:
        save_resolved(cfg, out / "config.yaml")
    stage = SFTStage(cfg, layout, out)
    start = stage.resume()
    stage.logger = RunLogger(
        out,
        "sft",
        enabled=layout.is_logging_rank,
        total_steps=cfg.train.steps,
        start_step=start,
        settings=cfg.logging,
        run_config=dataclasses.asdict(cfg),
    )
    outcome = run_loop(cfg.train, stage, stage.logger, start=start, evaluate_before=cfg.train.eval_before)
    stage.logger.close()
    summary = {
        "steps": outcome.steps,
        "stopped_early": outcome.stopped_early,
        "final_checkpoint": str(stage.ckpt_dir),
        **held_out_summary(outcome.final_evaluation, out / "eval", is_logging_rank=layout.is_logging_rank),
        "tokenizer": str(out / "tokenizer"),
        "vocab_size": len(stage.tokenizer),
        "wall_time_s": timer.elapsed(),
    }
    if layout.is_logging_rank:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


__all__ = ["SFTStage", "run_sft"]
