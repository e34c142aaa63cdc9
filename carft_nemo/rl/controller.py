"""The RL controller: one driver process running ReFT's PPO, CARFT or Dr.GRPO over Ray groups.

Roles (each a set of Ray actors with its own torch.distributed group and TP/PP/DP layout):
the *actor* (:class:`~carft_nemo.workers.actor.ActorWorker`: generation, log-probs,
updates), the *critic server* (:class:`~carft_nemo.workers.critic.CriticWorker`; absent
with the shared value head and for Dr.GRPO), an optional *reference* group, and the
*reward pool* (:class:`~carft_nemo.workers.reward.RewardPool`).

One step::

    questions (BatchSchedule, a function of the step) -> actor.generate   [phase generation]
    in parallel: actor log-probs (+ reference), critic.infer, reward.score [phases logprobs,
                                                                            critic, reward]
    controller: KL-in-reward, GAE + whitening (PPO) or group advantages (Dr.GRPO),
                CARFT partial reward
    in parallel: actor.train, critic.train                                  [phase training]

Checkpoints: every role saves its own ``checkpoints/<role>/step_N`` (atomic); a resume
takes the newest step complete for every role, so a crash between two roles' saves
falls back to the previous step. Any worker dying or hanging ends the run with a
:class:`~carft_nemo.distributed.ray_group.WorkerFailure` naming the role, within
``rl.call_timeout_s`` at worst and seconds in the usual case (Ray reports dead actors).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from carft_nemo.algorithms.contrastive import embedding_partial_reward
from carft_nemo.algorithms.grpo import drgrpo_normalizer, group_advantages, token_advantages
from carft_nemo.algorithms.ppo import gae_advantages, kl_penalized_rewards, masked_mean, masked_whiten
from carft_nemo.checkpoint.dist_checkpoint import list_checkpoints, read_metadata, resolve_checkpoint
from carft_nemo.config import ConfigError, require, save_resolved
from carft_nemo.data.datasets import load_examples
from carft_nemo.data.tokenization import encode_prompts, encode_sft, load_tokenizer
from carft_nemo.distributed.layout import check_model_layout
from carft_nemo.distributed.ray_group import RayWorkerGroup, WorkerFailure, start_local_ray, wait_all
from carft_nemo.evaluation.metrics import PairedChange
from carft_nemo.evaluation.runner import EvalResult, baseline_accuracy, record_eval
from carft_nemo.models.config import ModelConfig
from carft_nemo.rl.config import RLConfig
from carft_nemo.rl.experience import AnnotatedBatch, action_mask, join_rollouts, lcs_split, pooled_embeddings
from carft_nemo.training.batches import BatchSchedule
from carft_nemo.training.preemption import PreemptionHandler
from carft_nemo.training.run_log import LOG, RunLogger, setup_logging
from carft_nemo.workers.actor import ActorSpec, ActorWorker
from carft_nemo.workers.actor_loss import ActorLossSettings
from carft_nemo.workers.critic import CriticSpec, CriticTrainSettings, CriticWorker
from carft_nemo.workers.model_worker import ReplicaMap, concat_rows, shard_rows
from carft_nemo.workers.reward import RewardPool

# ---------------------------------------------------------------------------- start-up checks


def resolve_sft(cfg: RLConfig) -> tuple[Path, Path, ModelConfig]:
    """(SFT checkpoint step folder, tokenizer folder, model config) from ``cfg.sft_checkpoint``."""
    require(bool(cfg.sft_checkpoint), "sft_checkpoint", "set it to the SFT output dir (or a step_N folder)")
    given = Path(cfg.sft_checkpoint)
    root = given / "checkpoints" if (given / "checkpoints").is_dir() else given
    step_dir = resolve_checkpoint(root)
    sft_out = step_dir.parent.parent if step_dir.parent.name == "checkpoints" else step_dir.parent
    tokenizer = Path(cfg.tokenizer_path) if cfg.tokenizer_path else sft_out / "tokenizer"
    if not tokenizer.exists():
        raise ConfigError(f"tokenizer_path: {tokenizer} does not exist (set tokenizer_path)")
    if not cfg.model.is_unset:
        model = cfg.model
    else:
        saved = read_metadata(step_dir).get("metadata", {}).get("model")
        require(saved is not None, "model.preset", f"{step_dir} records no model; set model.preset")
        model = ModelConfig(**saved)
    return step_dir, tokenizer, model


def check_layouts(cfg: RLConfig, model: ModelConfig) -> dict[str, int]:
    """Every group's layout and batch divisibility, before any worker starts; returns DP sizes."""
    dps = {"actor": check_model_layout(cfg.actor.parallel, cfg.actor.num_workers, model)}
    groups = [("actor", cfg.actor.micro_batch_size)]
    if cfg.uses_critic_group:
        dps["critic"] = check_model_layout(cfg.critic.parallel, cfg.critic.num_workers, model)
        groups.append(("critic", cfg.critic.micro_batch_size))
    if cfg.reference.mode == "group":
        dps["reference"] = check_model_layout(cfg.reference.parallel, cfg.reference.num_workers, model)
        groups.append(("reference", cfg.actor.micro_batch_size))
    rollout, mini = cfg.rl.rollout_size, cfg.rl.mini_batch_size
    for role, micro in groups:
        dp = dps[role]
        require(
            rollout % (dp * micro) == 0,
            f"{role}.micro_batch_size",
            f"the rollout of {rollout} samples must split into {dp} data-parallel replicas x micro-batches of {micro}",
        )
        if role != "reference":
            require(
                mini % (dp * micro) == 0,
                "rl.mini_batch_size",
                f"{mini} must be a multiple of {role} data parallel x micro_batch_size = {dp} x {micro}",
            )
    return dps


def worker_cpus(cfg: RLConfig) -> int:
    """Ray logical CPUs one run's workers hold (one a worker, every role)."""
    cpus = cfg.actor.num_workers + cfg.reward.num_workers
    cpus += cfg.critic.num_workers if cfg.uses_critic_group else 0
    cpus += cfg.reference.num_workers if cfg.reference.mode == "group" else 0
    return cpus


def _common_steps(roots: list[Path]) -> list[int]:
    """Steps with a complete checkpoint under every root, ascending."""
    steps = [set(s for s, _ in list_checkpoints(r)) for r in roots]
    return sorted(set.intersection(*steps)) if steps else []


# ---------------------------------------------------------------------------- the run


class RLRun:
    """State of one RL run on the controller; :meth:`run` is the loop."""

    def __init__(self, cfg: RLConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.started = time.perf_counter()
        setup_logging(True)
        self.sft_step, tokenizer_dir, self.model_cfg = resolve_sft(cfg)
        self.dps = check_layouts(cfg, self.model_cfg)
        save_resolved(cfg, self.out / "config.yaml")
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.tokenizer_dir = tokenizer_dir
        # A model's embedding may have more rows than its tokenizer has ids (Qwen2.5: 152,064 vs
        # 151,665); the extra ids are never sampled (log-probs mask them by the tokenizer size).
        if self.model_cfg.vocab_size and self.model_cfg.vocab_size < len(self.tokenizer):
            raise ConfigError(f"model.vocab_size {self.model_cfg.vocab_size} < tokenizer size {len(self.tokenizer)}")
        if not self.model_cfg.vocab_size:
            self.model_cfg = self.model_cfg.with_vocab(len(self.tokenizer))
        self._load_data()
        self.ckpt_roots = {"actor": self.out / "checkpoints" / "actor"}
        if cfg.uses_critic_group:
            self.ckpt_roots["critic"] = self.out / "checkpoints" / "critic"
        self.groups: dict[str, Any] = {}
        self.owns_ray = False

    def _load_data(self) -> None:
        cfg = self.cfg
        train = load_examples(cfg.train_data)
        prompts, kept, stats = encode_prompts(train, self.tokenizer, cfg.encoding)
        keep = set(kept)
        self.train_examples = [ex for ex in train if ex.id in keep]
        self.train_prompts = prompts
        if cfg.contrastive.enabled:
            annotated, _ = encode_sft(self.train_examples, self.tokenizer, cfg.encoding)
            require(
                len(annotated) == len(self.train_examples),
                "encoding",
                "every kept question needs its annotated CoT (lower encoding limits dropped some)",
            )
            self.train_annotated = annotated
        evals = load_examples(cfg.eval_data)
        if cfg.rl.eval_examples:
            evals = evals[: cfg.rl.eval_examples]
        self.eval_prompts, eval_kept, _ = encode_prompts(evals, self.tokenizer, cfg.encoding)
        eval_keep = set(eval_kept)
        self.eval_examples = [ex for ex in evals if ex.id in eval_keep]
        LOG.info(
            "data: %d training questions (%d prompts cut/dropped), %d held-out questions",
            len(self.train_examples),
            stats.prompts_truncated + stats.dropped,
            len(self.eval_examples),
        )

    # ------------------------------------------------------------------ workers

    def start_workers(self) -> None:
        cfg = self.cfg
        dims = dict(
            num_layers=self.model_cfg.num_layers,
            num_attention_heads=self.model_cfg.num_attention_heads,
            num_query_groups=self.model_cfg.num_query_groups,
        )
        self.owns_ray = start_local_ray(num_cpus=worker_cpus(cfg), address=cfg.ray_address)
        total = cfg.rl.optimizer_steps  # the LR schedules count optimizer steps, several per RL step
        t0 = time.perf_counter()
        actor = RayWorkerGroup(
            ActorWorker, cfg.actor.num_workers, cfg.actor.parallel, seed=cfg.rl.seed, model_dims=dims
        )
        self.groups["actor"] = actor
        spec = ActorSpec(
            self.model_cfg,
            cfg.actor.parallel,
            str(self.sft_step),
            str(self.tokenizer_dir),
            optim=cfg.actor.optim,
            total_steps=total,
            shared_value_head=cfg.uses_shared_value_head,
            contrastive_dim=cfg.contrastive.projection_dim if cfg.contrastive.enabled else 0,
            keep_reference=cfg.reference.mode == "swap" and cfg.rl.kl_coef > 0,
            micro_batch_size=cfg.actor.micro_batch_size,
            cpu_threads=cfg.actor.cpu_threads,
            temperature=cfg.generation.temperature,
        )
        calls = {"actor": actor.submit("setup", spec)}
        if cfg.uses_critic_group:
            critic = RayWorkerGroup(
                CriticWorker, cfg.critic.num_workers, cfg.critic.parallel, seed=cfg.rl.seed + 1, model_dims=dims
            )
            self.groups["critic"] = critic
            calls["critic"] = critic.submit(
                "setup",
                CriticSpec(
                    self.model_cfg,
                    cfg.critic.parallel,
                    cfg.critic.optim,
                    str(self.sft_step),
                    total_steps=total,
                    micro_batch_size=cfg.critic.micro_batch_size,
                    cpu_threads=cfg.critic.cpu_threads,
                ),
            )
        if cfg.reference.mode == "group" and cfg.rl.kl_coef > 0:
            ref = RayWorkerGroup(
                ActorWorker, cfg.reference.num_workers, cfg.reference.parallel, seed=cfg.rl.seed, model_dims=dims
            )
            self.groups["reference"] = ref
            calls["reference"] = ref.submit(
                "setup",
                dataclasses.replace(
                    spec,
                    parallel=cfg.reference.parallel,
                    optim=None,
                    shared_value_head=False,
                    contrastive_dim=0,
                    keep_reference=False,
                ),
            )
        self.reward = RewardPool(cfg.reward.num_workers, cfg.reward.tolerance, cfg.reward.sandbox)
        self.groups["reward"] = self.reward
        wait_all(calls, cfg.rl.call_timeout_s)
        self.maps = {
            role: ReplicaMap.from_layouts(g.layouts) for role, g in self.groups.items() if isinstance(g, RayWorkerGroup)
        }
        LOG.info(
            "workers up in %.1f s: %s",
            time.perf_counter() - t0,
            ", ".join(f"{role} x{len(g.actors)}" for role, g in self.groups.items()),
        )

    def stop_workers(self) -> None:
        """Kill every role's actors, then the Ray instance if this run started it (see shared_ray)."""
        import ray

        for group in self.groups.values():
            try:
                group.kill()
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        self.groups = {}
        if self.owns_ray and ray.is_initialized():
            ray.shutdown()

    def _sharded(self, role: str, method: str, batch: dict[str, torch.Tensor], *args: Any, **kwargs: Any) -> list:
        group, rmap = self.groups[role], self.maps[role]
        shards = shard_rows(batch, rmap.data_parallel)
        return [
            getattr(actor, method).remote(shard, *args, **kwargs)
            for actor, shard in zip(group.actors, rmap.per_rank(shards))
        ]

    def _joined(self, role: str, results: list) -> dict[str, torch.Tensor]:
        return concat_rows(self.maps[role].answers(results))

    # ------------------------------------------------------------------ one step

    def generate(self, step: int) -> tuple[list[int], Any]:
        cfg = self.cfg
        schedule = BatchSchedule(len(self.train_examples), cfg.rl.questions_per_step, seed=cfg.rl.seed)
        questions = schedule.global_indices(step)
        sample_q = [q for q in questions for _ in range(cfg.rl.samples_per_question)]
        prompts = [self.train_prompts[q] for q in sample_q]
        gen_cfg = dataclasses.replace(
            cfg.generation,
            seed=cfg.rl.seed * 7919 + step,
            eos_token_ids=(self.tokenizer.eos_token_id,),
            pad_token_id=self.tokenizer.pad_token_id,
        )
        rmap = self.maps["actor"]
        per = len(prompts) // rmap.data_parallel
        shards = [(prompts[d * per : (d + 1) * per], gen_cfg) for d in range(rmap.data_parallel)]
        results = wait_all(
            {"actor": self.groups["actor"].submit_per_rank("generate", rmap.per_rank(shards))}, cfg.rl.call_timeout_s
        )["actor"]
        return sample_q, join_rollouts(rmap.answers(results))

    def make_experience(self, sample_q: list[int], rollout: Any, phases: dict[str, float]) -> tuple[dict, dict]:
        """Everything the updates need, plus step metrics. Runs the overlapped inference phase."""
        cfg = self.cfg
        pad = self.tokenizer.pad_token_id
        batch = rollout.to_batch(pad)
        # lengths: each forward micro-batch stops at its longest row (ModelWorker.collect_forward)
        tokens = {"tokens": batch.tokens, "lengths": batch.prompt_lengths + batch.response_lengths}
        texts = self.tokenizer.batch_decode(rollout.responses, skip_special_tokens=True)
        examples = [self.train_examples[q] for q in sample_q]
        carft = cfg.contrastive.enabled
        annotated = AnnotatedBatch.build([self.train_annotated[q] for q in sample_q], pad) if carft else None

        t0 = time.perf_counter()
        calls: dict[str, list] = {"reward": self.reward.submit(texts, examples)}
        # CARFT: the annotated sequences ride in the same actor / critic calls as the on-policy
        # ones (rows appended, right-padded to a common width; causal attention makes the padding
        # invisible), so they cost their FLOPs but no extra round trip or schedule set-up.
        both = (
            {
                "tokens": _stack_rows(batch.tokens, annotated.tokens, pad),
                "lengths": torch.cat([tokens["lengths"], annotated.lengths]),
            }
            if carft
            else tokens
        )
        if cfg.uses_critic_group:
            calls["critic"] = self._sharded("critic", "infer", both)
        outputs = (
            ("logprobs",) + (("values",) if cfg.uses_shared_value_head else ()) + (("embeddings",) if carft else ())
        )
        calls["actor"] = self._sharded("actor", "forward", both, outputs=outputs)
        if cfg.rl.kl_coef > 0:
            if cfg.reference.mode == "group":
                calls["reference"] = self._sharded("reference", "forward", tokens)
            else:
                calls["reference"] = self._sharded("actor", "forward", tokens, reference=True)
        finished: dict[str, float] = {}
        results = wait_all(calls, cfg.rl.call_timeout_s, finished_at=finished)
        phases["logprobs"] = max(finished.get("actor", t0), finished.get("reference", t0)) - t0
        phases["critic"] = finished.get("critic", t0) - t0
        phases["reward"] = finished["reward"] - t0

        role_of = {
            "actor": "actor",
            "critic": "critic",
            "reference": "reference" if cfg.reference.mode == "group" else "actor",
        }
        out = {k: self._joined(role_of[k], v) for k, v in results.items() if k != "reward"}
        if carft:
            rows, width, ann_width = batch.tokens.shape[0], batch.tokens.shape[1], annotated.tokens.shape[1]
            for role in ("actor", "critic"):
                if role in out:
                    joined = out.pop(role)
                    out[role] = {k: _columns(v[:rows], k, width) for k, v in joined.items()}
                    out[f"{role}_annotated"] = {k: _columns(v[rows:], k, ann_width) for k, v in joined.items()}
        scored = RewardPool.join(results["reward"])
        rewards = torch.tensor([s.reward for s in scored], dtype=torch.float32)
        correct = torch.tensor([s.correct for s in scored])
        extracted = torch.tensor([s.extracted for s in scored])
        finished_mask = batch.finished
        mask = action_mask(batch)
        logprobs = out["actor"]["logprobs"] * mask
        ref_logprobs = out["reference"]["logprobs"] * mask if "reference" in out else logprobs.clone()

        metrics: dict[str, float] = {}
        exp = {"tokens": batch.tokens, "action_mask": mask, "old_logprobs": logprobs}
        if carft:
            token_values = out["actor"]["values"] if cfg.uses_shared_value_head else out["critic"]["values"]
            ann_values = (
                out["actor_annotated"]["values"] if cfg.uses_shared_value_head else out["critic_annotated"]["values"]
            )
            exp.update(
                response_mask=batch.response_mask,
                correct=correct,
                critic_token_values=token_values,
                ann_embeddings=out["actor_annotated"]["embeddings"],
                ann_values=ann_values,
                ann_cot_mask=annotated.cot_mask,
            )
            if cfg.contrastive.uses_negative:
                exp.update(lcs_split(annotated, batch))
            wrong_extractable = extracted & ~correct
            if cfg.contrastive.partial_reward:
                z_ann = pooled_embeddings(out["actor_annotated"]["embeddings"], ann_values, annotated.cot_mask)
                z_gen = pooled_embeddings(out["actor"]["embeddings"], token_values, batch.response_mask)
                shaped = embedding_partial_reward(cfg.contrastive, z_ann, z_gen, rewards, wrong_extractable)
                if wrong_extractable.any():
                    metrics["partial_reward"] = float(shaped[wrong_extractable].mean())
                rewards = shaped
        scores = rewards.clone()
        if cfg.rl.unfinished_score is not None:
            scores = torch.where(finished_mask, scores, torch.full_like(scores, cfg.rl.unfinished_score))

        token_rewards, kl = kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, cfg.rl.kl_coef)
        if cfg.rl.algorithm == "grpo":
            adv = token_advantages(group_advantages(scores, cfg.rl.samples_per_question), mask)
        else:
            values_full = out["actor"]["values"] if cfg.uses_shared_value_head else out["critic"]["values"]
            old_values = values_full[:, :-1] * mask
            adv, returns = gae_advantages(token_rewards, old_values, mask, cfg.rl.gamma, cfg.rl.lam)
            metrics["value_mean"] = float(masked_mean(old_values, mask))
            metrics["return_mean"] = float(masked_mean(returns, mask))
            if cfg.rl.whiten_advantages:
                adv = masked_whiten(adv, mask)
            exp.update(old_values=old_values, returns=returns)
        exp["advantages"] = adv
        lengths = batch.response_lengths.float()
        metrics.update(
            {
                "reward": float(rewards.mean()),
                "score": float(scores.mean()),
                "accuracy": float(correct.float().mean()),
                "extracted": float(extracted.float().mean()),
                "kl": float((kl.sum(dim=1)).mean()),
                "response_length": float(lengths.mean()),
                "finished": float(finished_mask.float().mean()),
                "advantage_abs_mean": float(masked_mean(adv.abs(), mask)),
            }
        )
        return exp, metrics

    def train(self, step: int, exp: dict[str, torch.Tensor], phases: dict[str, float]) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.perf_counter()
        dp = self.dps["actor"]
        grpo = cfg.rl.algorithm == "grpo"
        settings = ActorLossSettings(
            epochs=cfg.rl.ppo_epochs,
            mini_batch_rows=cfg.rl.mini_batch_size // dp,
            seed=cfg.rl.seed * 31 + step,
            clip_ratio=cfg.rl.clip_ratio,
            temperature=cfg.generation.temperature,
            constant_normalizer=drgrpo_normalizer(cfg.rl.mini_batch_size, cfg.generation.max_new_tokens)
            if grpo
            else 0.0,
            shared_value=cfg.uses_shared_value_head,
            value_clip=cfg.critic.value_clip,
            value_loss_coef=cfg.critic.value_loss_coef,
            contrastive=cfg.contrastive if cfg.contrastive.enabled else None,
        )
        actor_keys = [k for k in exp if cfg.uses_shared_value_head or k not in ("old_values", "returns")]
        calls = {}
        if step >= cfg.rl.critic_warmup_steps:
            calls["actor"] = self._sharded("actor", "train", {k: exp[k] for k in actor_keys}, settings)
        if cfg.uses_critic_group:
            critic_batch = {k: exp[k] for k in ("tokens", "action_mask", "old_values", "returns")}
            calls["critic"] = self._sharded(
                "critic",
                "train",
                critic_batch,
                CriticTrainSettings(
                    epochs=cfg.rl.ppo_epochs,
                    mini_batch_rows=cfg.rl.mini_batch_size // self.dps["critic"],
                    seed=cfg.rl.seed * 31 + step,
                    value_clip=cfg.critic.value_clip,
                ),
            )
        results = wait_all(calls, cfg.rl.call_timeout_s)
        phases["training"] = time.perf_counter() - t0
        actor_sums = self.maps["actor"].answers(results["actor"])[0] if "actor" in results else None
        critic_sums = self.maps["critic"].answers(results["critic"])[0] if "critic" in results else None
        return _train_metrics(actor_sums, critic_sums)

    def evaluate(self, step: int, name: str, logger: RunLogger) -> tuple[EvalResult, PairedChange | None]:
        t0 = time.perf_counter()
        gen_cfg = dataclasses.replace(
            self.cfg.eval_generation,
            eos_token_ids=(self.tokenizer.eos_token_id,),
            pad_token_id=self.tokenizer.pad_token_id,
        )
        answers = wait_all(
            {"actor": self.groups["actor"].submit("evaluate", self.eval_examples, self.eval_prompts, gen_cfg)},
            self.cfg.rl.call_timeout_s,
        )["actor"]
        got = answers[0]
        result = EvalResult(
            got["summary"]["accuracy"],
            None,
            got["summary"]["num_examples"],
            got["summary"]["mean_response_tokens"],
            got["records"],
        )
        return result, record_eval(result, self.out / "eval", name, step, logger, time.perf_counter() - t0)

    def save(self, step: int) -> None:
        t0 = time.perf_counter()
        calls = {
            "actor": self.groups["actor"].submit(
                "save",
                str(self.ckpt_roots["actor"]),
                step,
                {"step": step},
                {"stage": self.cfg.method, "model": dataclasses.asdict(self.model_cfg)},
            )
        }
        if "critic" in self.ckpt_roots:
            calls["critic"] = self.groups["critic"].submit("save", str(self.ckpt_roots["critic"]), step)
        wait_all(calls, self.cfg.rl.call_timeout_s)
        self._prune()
        LOG.info("checkpoint step %d saved in %.1f s", step, time.perf_counter() - t0)

    def _prune(self) -> None:
        """Keep the newest ``keep_checkpoints`` steps complete for every role (never break a common step)."""
        roots = list(self.ckpt_roots.values())
        keep = set(_common_steps(roots)[-self.cfg.rl.keep_checkpoints :])
        for root in roots:
            for s, path in list_checkpoints(root):
                if s not in keep and s < max(keep, default=0):
                    shutil.rmtree(path, ignore_errors=True)

    def resume_step(self) -> int:
        step = max(_common_steps(list(self.ckpt_roots.values())), default=0)
        if step == 0:
            return 0
        calls = {"actor": self.groups["actor"].submit("load", str(self.ckpt_roots["actor"] / f"step_{step}"))}
        if "critic" in self.ckpt_roots:
            calls["critic"] = self.groups["critic"].submit("load", str(self.ckpt_roots["critic"] / f"step_{step}"))
        wait_all(calls, self.cfg.rl.call_timeout_s)
        LOG.info("resumed from %s (step %d)", self.ckpt_roots["actor"] / f"step_{step}", step)
        return step

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        logger = None
        try:
            self.start_workers()
            start = self.resume_step()
            logger = RunLogger(self.out, cfg.method, enabled=True, total_steps=cfg.rl.steps, start_step=start)
            if start == 0:
                self.evaluate(0, "before", logger)
            preemption = PreemptionHandler()
            step, stopped_early = start, False
            rewards: list[float] = []
            try:
                while step < cfg.rl.steps:
                    t_step = time.perf_counter()
                    phases: dict[str, float] = {}
                    t0 = time.perf_counter()
                    sample_q, rollout = self.generate(step)
                    phases["generation"] = time.perf_counter() - t0
                    exp, metrics = self.make_experience(sample_q, rollout, phases)
                    metrics.update(self.train(step, exp, phases))
                    step += 1
                    metrics.update({f"time/{k}": v for k, v in phases.items()})
                    metrics["step_time_s"] = time.perf_counter() - t_step
                    rewards.append(metrics["reward"])
                    logger.log(step, metrics)
                    logger.advance()
                    last = step == cfg.rl.steps
                    if cfg.rl.eval_every and step % cfg.rl.eval_every == 0 and not last:
                        self.evaluate(step, f"step_{step}", logger)
                    saved = last or (cfg.rl.save_every and step % cfg.rl.save_every == 0)
                    if saved:
                        self.save(step)
                    if not last and preemption.should_stop():
                        LOG.warning("stop signal %s: saving at step %d and exiting", preemption.received, step)
                        if not saved:
                            self.save(step)
                        stopped_early = True
                        break
            finally:
                preemption.restore()
            after, change = (None, None) if stopped_early else self.evaluate(step, "final", logger)
        except WorkerFailure as err:
            LOG.error(
                "%s; the newest complete checkpoint under %s is usable: rerun the same command to resume",
                err,
                self.out / "checkpoints",
            )
            raise
        finally:
            if logger is not None:
                logger.close()  # no progress bar redrawn after the error line at exit
            self.stop_workers()
        summary = {
            "method": cfg.method,
            "steps": step,
            "stopped_early": stopped_early,
            "final_checkpoint": str(self.ckpt_roots["actor"]),
            "accuracy_before": baseline_accuracy(self.out / "eval"),
            "accuracy_after": after.accuracy if after else None,
            "held_out_change": change.as_dict() if change else None,
            "reward_first_steps": _mean(rewards[:5]),
            "reward_last_steps": _mean(rewards[-5:]),
            "wall_time_s": time.perf_counter() - self.started,
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def _stack_rows(a: torch.Tensor, b: torch.Tensor, pad: int) -> torch.Tensor:
    """Rows of ``a`` then ``b`` (``[B, S]`` token ids), right-padded to the wider of the two."""
    width = max(a.shape[1], b.shape[1])
    grow = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=pad)  # noqa: E731
    return torch.cat([grow(a), grow(b)], dim=0)


def _columns(t: torch.Tensor, key: str, width: int) -> torch.Tensor:
    """Cut a padded per-token output back to ``width`` positions (log-probs have one fewer)."""
    return t[:, : width - 1] if key == "logprobs" else t[:, :width]


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _train_metrics(actor: dict[str, float] | None, critic: dict[str, float] | None) -> dict[str, float]:
    """Step metrics from the workers' sums (see ActorWorker.train / CriticWorker.train).

    ``actor`` is None in a critic warm-up round (the policy was not updated).
    """
    out: dict[str, float] = {"policy_updated": float(actor is not None)}
    if actor is not None:
        tokens = max(actor.get("policy/tokens", 0.0), 1.0)
        out.update(
            {
                "actor_loss": actor["loss"] / max(actor["updates"], 1.0),
                "clip_fraction": actor.get("policy/clipped_tokens", 0.0) / tokens,
                "approx_kl": actor.get("policy/approx_kl", 0.0) / tokens,
                "ratio_mean": actor.get("policy/ratio", 0.0) / tokens,
                "entropy": actor.get("policy/entropy", 0.0) / tokens,
                "grad_norm": actor["grad_norm"],
                "updates_skipped": actor["updates_skipped"],
            }
        )
    value_source = critic if critic is not None else (actor or {})
    if "value/tokens" in value_source:
        vt = max(value_source["value/tokens"], 1.0)
        out["value_loss"] = 0.5 * value_source["value/error"] / vt
        out["value_clip_fraction"] = value_source["value/clipped_tokens"] / vt
    if critic is not None:
        out["critic_grad_norm"] = critic["grad_norm"]
    for key in (
        "contrastive/loss",
        "contrastive/positive_loss",
        "contrastive/negative_loss",
        "contrastive/num_positive",
        "contrastive/num_negative",
    ):
        if actor is not None and key in actor:
            out[key] = actor[key] / max(actor.get("count/micro_batches", 0.0), 1.0)
    return out


def run_rl(cfg: RLConfig) -> dict[str, Any]:
    """Run (or resume) an RL stage as configured; returns its summary (also summary.json)."""
    return RLRun(cfg).run()


__all__ = ["RLRun", "check_layouts", "resolve_sft", "run_rl", "worker_cpus"]
