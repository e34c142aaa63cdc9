"""The RL controller: one driver process running ReFT's PPO, CARFT or Dr.GRPO over Ray groups.

Roles (each a group of Ray actors; the model groups have their own torch.distributed group
and TP/PP/DP layout): the *actor* (:class:`~carft_nemo.workers.contracts.PolicyWorker`:
generation, log-probs, updates), the *critic server*
(:class:`~carft_nemo.workers.contracts.ValueWorker`; absent with the shared value head and
for Dr.GRPO), an optional *reference* group, and the *reward pool*
(:class:`~carft_nemo.workers.contracts.RewardScorer`).

One step (:meth:`RLRun.train_step`)::

    questions (BatchSchedule, a function of the step) -> actor.generate      [phase generation]
    in parallel: actor log-probs (+ reference), critic values, reward scores [phases logprobs,
                                                                              critic, reward]
    controller: build_experience (rl/experience.py: values, reward shaping, KL penalty,
                advantages by the configured estimator, metrics)
    in parallel: actor.train, critic.train                                   [phase training]

The cadence around the steps (evaluations, checkpoints, stop signals) is
:func:`carft_nemo.training.loop.run_loop`'s. Checkpoints: every role saves its own
``checkpoints/<role>/step_N`` (atomic); a resume takes the newest step complete for every
role, so a crash between two roles' saves falls back to the previous step. Any worker dying
or hanging ends the run with a :class:`~carft_nemo.distributed.ray_group.WorkerFailure`
naming the role, within ``rl.call_timeout_s`` at worst and seconds in the usual case.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from carft_nemo.algorithms.advantages import AdvantageSettings
from carft_nemo.algorithms.grpo import drgrpo_normalizer
from carft_nemo.checkpoint.dist_checkpoint import (
    common_steps,
    discard_checkpoints_after,
    prune_checkpoints,
    read_metadata,
    resolve_checkpoint,
)
from carft_nemo.config import ConfigError, require, save_resolved
from carft_nemo.data.datasets import load_examples
from carft_nemo.data.tokenization import encode_prompts, encode_sft, load_tokenizer
from carft_nemo.distributed.layout import check_model_layout
from carft_nemo.distributed.placement import WorkerLocation, check_cluster_has
from carft_nemo.distributed.ray_group import RayWorkerGroup, WorkerFailure, WorkerGroup, start_local_ray, wait_all
from carft_nemo.distributed.replicas import concat_rows
from carft_nemo.evaluation.metrics import PairedChange
from carft_nemo.evaluation.runner import EvalResult, held_out_summary, record_eval
from carft_nemo.generation.rollout import Rollout
from carft_nemo.models.config import ModelConfig, check_context_window
from carft_nemo.planning.plan import check_at_start, plan_rl, running_precision
from carft_nemo.rl.collapse_guard import CollapseGuard, Trigger
from carft_nemo.rl.config import LONGEST_SEQUENCE_KEYS, RLConfig
from carft_nemo.rl.experience import (
    AnnotatedBatch,
    Experience,
    ExperienceSettings,
    InferenceResults,
    build_experience,
    forward_rows,
    join_rollouts,
    split_annotated_outputs,
    with_annotated_rows,
)
from carft_nemo.rl.step_metrics import train_metrics
from carft_nemo.seeding import derive_seed
from carft_nemo.telemetry.run_log import LOG, RunLogger, setup_logging
from carft_nemo.telemetry.timing import PhaseTimer
from carft_nemo.training.batches import BatchSchedule
from carft_nemo.training.loop import LoopOutcome, Rewind, run_loop
from carft_nemo.workers.actor import ActorSpec, ActorWorker
from carft_nemo.workers.actor_loss import ActorTrainSettings
from carft_nemo.workers.contracts import PolicyWorker, RewardScorer, ValueWorker
from carft_nemo.workers.critic import CriticSpec, CriticTrainSettings, CriticWorker
from carft_nemo.workers.reward import RewardWorker

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
        check_context_window(model, cfg.longest_sequence, f"{LONGEST_SEQUENCE_KEYS}; the model of {step_dir}")
    return step_dir, tokenizer, model


def model_groups(cfg: RLConfig) -> dict[str, tuple[Any, int]]:
    """The model groups a run starts: role -> (its layout config section, its forward micro-batch size)."""
    groups = {"actor": (cfg.actor, cfg.actor.micro_batch_size)}
    if cfg.uses_critic_group:
        groups["critic"] = (cfg.critic, cfg.critic.micro_batch_size)
    if cfg.uses_reference_group:
        groups["reference"] = (cfg.reference, cfg.actor.micro_batch_size)
    return groups


def check_layouts(cfg: RLConfig, model: ModelConfig) -> dict[str, int]:
    """Every group's layout and batch divisibility, before any worker starts; returns DP sizes."""
    dps, rollout, mini = {}, cfg.rl.rollout_size, cfg.rl.mini_batch_size
    for role, (section, micro) in model_groups(cfg).items():
        dp = dps[role] = check_model_layout(section.parallel, section.num_workers, model, key=f"{role}.parallel")
        if section.nodes:  # a tensor- or context-parallel group split over nodes would talk over the network
            per_node, inner = section.num_workers // len(section.nodes), section.parallel.tensor_parallel
            inner *= section.parallel.context_parallel
            require(
                per_node % inner == 0,
                f"{role}.nodes",
                f"{per_node} ranks per node must be a multiple of tensor x context parallel = {inner}, "
                "so that those groups stay inside a node",
            )
        require(
            rollout % (dp * micro) == 0,
            f"{role}.micro_batch_size",
            f"the rollout of {rollout} samples must split into {dp} data-parallel replicas x micro-batches of {micro}",
        )
        if role == "actor":  # generation's replicas: data x context parallel (WorkerGroup.generating)
            cp = section.parallel.context_parallel
            require(
                rollout % (dp * cp) == 0,
                "actor.parallel.context_parallel",
                f"the rollout of {rollout} samples must split over {dp} x {cp} generation replicas "
                "(context-parallel ranks generate prompts of their own)",
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
    return sum(section.num_workers for section, _ in model_groups(cfg).values()) + cfg.reward.num_workers


def experience_settings(cfg: RLConfig) -> ExperienceSettings:
    """How :func:`~carft_nemo.rl.experience.build_experience` turns this run's rollouts into training tensors."""
    loop = cfg.rl
    return ExperienceSettings(
        estimator=loop.advantage_estimator,
        advantage=AdvantageSettings(loop.gamma, loop.lam, loop.whiten_advantages, loop.samples_per_question),
        kl_coef=loop.kl_coef,
        unfinished_score=loop.unfinished_score,
        shared_value_head=cfg.uses_shared_value_head,
        contrastive=cfg.contrastive if cfg.contrastive.enabled else None,
    )


# ---------------------------------------------------------------------------- the run


class RLRun:
    """State of one RL run on the controller; :meth:`run` is the loop, the rest are its hooks."""

    def __init__(self, cfg: RLConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.timer = PhaseTimer()  # the whole run's wall time
        setup_logging(True)
        self.sft_step, self.tokenizer_dir, self.model_cfg = resolve_sft(cfg)
        self.dps = check_layouts(cfg, self.model_cfg)
        save_resolved(cfg, self.out / "config.yaml")
        self.tokenizer = load_tokenizer(self.tokenizer_dir)
        # A model's embedding may have more rows than its tokenizer has ids (Qwen2.5: 152,064 vs
        # 151,665); the extra ids are never sampled (log-probs mask them by the tokenizer size).
        if self.model_cfg.vocab_size and self.model_cfg.vocab_size < len(self.tokenizer):
            raise ConfigError(f"model.vocab_size {self.model_cfg.vocab_size} < tokenizer size {len(self.tokenizer)}")
        if not self.model_cfg.vocab_size:
            self.model_cfg = self.model_cfg.with_vocab(len(self.tokenizer))
        # before any worker starts: a layout that cannot fit its GPUs ends here, naming the role
        check_at_start(plan_rl(cfg, self.model_cfg, running_precision(self.model_cfg)), cfg.cluster)
        self._load_data()
        self.settings = experience_settings(cfg)
        self.schedule = BatchSchedule(len(self.train_examples), cfg.rl.questions_per_step, seed=cfg.rl.seed)
        self.ckpt_roots = {"actor": self.out / "checkpoints" / "actor"}
        if cfg.uses_critic_group:
            self.ckpt_roots["critic"] = self.out / "checkpoints" / "critic"
        self.groups: dict[str, WorkerGroup] = {}
        self.owns_ray = False
        self.logger: RunLogger | None = None
        self.rewards: list[float] = []  # per step, for the summary
        self.guard = CollapseGuard(cfg.rl.collapse_guard, self.out) if cfg.rl.collapse_guard.enabled else None

    def _load_data(self) -> None:
        cfg = self.cfg
        train = load_examples(cfg.train_data)
        self.train_prompts, kept, stats = encode_prompts(train, self.tokenizer, cfg.encoding)
        keep = set(kept)
        self.train_examples = [ex for ex in train if ex.id in keep]
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
        """Start every role's group, build the models in parallel, and wait for all of them."""
        cfg, timer = self.cfg, PhaseTimer()
        self.owns_ray = start_local_ray(num_cpus=worker_cpus(cfg), address=cfg.ray_address)
        self._check_placement()
        spec = self._actor_spec()
        calls = {"actor": self._start_group("actor", ActorWorker, cfg.actor, spec)}
        if cfg.uses_critic_group:
            calls["critic"] = self._start_group("critic", CriticWorker, cfg.critic, self._critic_spec())
        if cfg.uses_reference_group:
            frozen = dataclasses.replace(
                spec,
                parallel=cfg.reference.parallel,
                optim=None,
                shared_value_head=False,
                contrastive_dim=0,
                keep_reference=False,
            )
            calls["reference"] = self._start_group("reference", ActorWorker, cfg.reference, frozen)
        self.groups["reward"] = WorkerGroup.independent(
            RewardWorker,
            cfg.reward.num_workers,
            cfg.reward.tolerance,
            cfg.reward.sandbox,
            "pcot" in (cfg.train_data.cot_style, cfg.eval_data.cot_style),
            nodes=cfg.reward.nodes,
        )
        self._await(calls)
        groups = ", ".join(
            f"{role} x{g.world_size} on {', '.join(dict.fromkeys(map(str, g.locations)))}"
            for role, g in self.groups.items()
        )
        LOG.info("workers up in %.1f s: %s", timer.elapsed(), groups)

    def _check_placement(self) -> None:
        """Every ``<role>.nodes`` names nodes the Ray cluster has (ConfigError naming the key)."""
        import ray

        resources = ray.cluster_resources()
        sections = {role: section for role, (section, _) in model_groups(self.cfg).items()}
        for role, section in {**sections, "reward": self.cfg.reward}.items():
            check_cluster_has(f"{role}.nodes", section.nodes, resources)

    def _start_group(self, role: str, worker_cls: type, section: Any, spec: Any) -> list:
        """Start ``role``'s model group (rendezvous included) and its ``setup(spec)`` calls."""
        seed = derive_seed(self.cfg.rl.seed, f"{role}_init")
        group = RayWorkerGroup(
            worker_cls,
            section.num_workers,
            section.parallel,
            seed=seed,
            model_dims=self.model_cfg.layout_dims,
            nodes=section.nodes,
        )
        self.groups[role] = group
        return group.submit(worker_cls.setup, spec)

    def _actor_spec(self) -> ActorSpec:
        cfg = self.cfg
        return ActorSpec(
            self.model_cfg,
            cfg.actor.parallel,
            str(self.sft_step),
            str(self.tokenizer_dir),
            optim=cfg.actor.optim,
            total_steps=cfg.rl.optimizer_steps,  # the LR schedules count optimizer steps, several per RL step
            shared_value_head=cfg.uses_shared_value_head,
            contrastive_dim=cfg.contrastive.projection_dim if cfg.contrastive.enabled else 0,
            keep_reference=cfg.reference.mode == "swap" and cfg.rl.kl_coef > 0,
            micro_batch_size=cfg.actor.micro_batch_size,
            packing=cfg.actor.packing,
            cpu_threads=cfg.actor.cpu_threads,
            temperature=cfg.generation.temperature,
        )

    def _critic_spec(self) -> CriticSpec:
        cfg = self.cfg
        return CriticSpec(
            self.model_cfg,
            cfg.critic.parallel,
            cfg.critic.optim,
            str(self.sft_step),
            total_steps=cfg.rl.optimizer_steps,
            micro_batch_size=cfg.critic.micro_batch_size,
            packing=cfg.critic.packing,
            cpu_threads=cfg.critic.cpu_threads,
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

    @property
    def locations(self) -> dict[str, list[WorkerLocation]]:
        """Each role's node per rank, for failures to name (:attr:`WorkerGroup.locations`)."""
        return {role: group.locations for role, group in self.groups.items()}

    def _await(self, calls: dict[str, list], **kwargs: Any) -> dict[str, list]:
        """:func:`wait_all` with the run's timeout and its workers' nodes (for failures to name)."""
        return wait_all(calls, self.cfg.rl.call_timeout_s, locations=self.locations, **kwargs)

    def _wait(self, calls: dict[str, list], finished_at: dict[str, float] | None = None) -> dict[str, list]:
        """Every role's results, each reduced to its replicas' answers (see ``WorkerGroup.answers``)."""
        roles = {name: self._group_of(name) for name in calls}
        results = self._await(calls, finished_at=finished_at, roles=roles)
        return {name: self.groups[self._group_of(name)].answers(r) for name, r in results.items()}

    def _group_of(self, call: str) -> str:
        """The group answering a call: the reference log-probs come from the actor in swap mode."""
        if call == "reference_logprobs":
            return "reference" if self.cfg.uses_reference_group else "actor"
        return {"policy": "actor", "values": "critic", "scores": "reward"}.get(call, call)

    # ------------------------------------------------------------------ one step

    def generate(self, step: int) -> tuple[list[int], Rollout]:
        """Step ``step``'s questions (``samples_per_question`` each) and the actor's rollouts of them."""
        cfg = self.cfg
        questions = self.schedule.global_indices(step)
        sample_q = [q for q in questions for _ in range(cfg.rl.samples_per_question)]
        gen_cfg = dataclasses.replace(
            cfg.generation,
            seed=derive_seed(cfg.rl.seed, "rollout_sampling", step),
            eos_token_ids=(self.tokenizer.eos_token_id,),
            pad_token_id=self.tokenizer.pad_token_id,
        )
        prompts = [self.train_prompts[q] for q in sample_q]
        # context-parallel ranks generate prompts of their own (WorkerGroup.generating)
        actor = self.groups["actor"].generating()
        calls = {"actor": actor.submit_rows(PolicyWorker.generate, (prompts,), gen_cfg)}
        results = self._await(calls, roles={"actor": "actor"})
        return sample_q, join_rollouts(actor.answers(results["actor"]))

    def infer(
        self, sample_q: list[int], rollout: Rollout, annotated: AnnotatedBatch | None, timer: PhaseTimer
    ) -> InferenceResults:
        """The overlapped inference phase: log-probs, values and rewards of the rollout at once."""
        cfg, started = self.cfg, timer.elapsed()
        rollout_rows = forward_rows(rollout.to_batch(self.tokenizer.pad_token_id))
        # CARFT: the annotated rows ride in the policy's and the critic's calls (with_annotated_rows)
        policy_rows = rollout_rows
        if annotated is not None:
            policy_rows = with_annotated_rows(rollout_rows, annotated, self.tokenizer.pad_token_id)
        texts = self.tokenizer.batch_decode(rollout.responses, skip_special_tokens=True)
        examples = [self.train_examples[q] for q in sample_q]
        calls = {"scores": self.groups["reward"].submit_rows(RewardScorer.score, (texts, examples))}
        outputs = ("logprobs",) + (("values",) if cfg.uses_shared_value_head else ())
        outputs += ("embeddings",) if annotated is not None else ()
        calls["policy"] = self.groups["actor"].submit_rows(PolicyWorker.forward, (policy_rows,), outputs=outputs)
        if cfg.uses_critic_group:
            calls["values"] = self.groups["critic"].submit_rows(ValueWorker.forward, (policy_rows,))
        if cfg.rl.kl_coef > 0:
            group, weights = self._group_of("reference_logprobs"), "policy" if cfg.uses_reference_group else "reference"
            calls["reference_logprobs"] = self.groups[group].submit_rows(
                PolicyWorker.forward, (rollout_rows,), weights=weights
            )
        finished: dict[str, float] = {}
        answers = self._wait(calls, finished_at=finished)
        self._record_inference_phases(timer, started, finished)
        return self._inference_results(answers, rollout_rows["tokens"].shape, annotated)

    @staticmethod
    def _record_inference_phases(timer: PhaseTimer, started: float, finished: dict[str, float]) -> None:
        """Each overlapped call's time from the common start (``finished``: perf_counter per call)."""
        done = {call: t - timer.started - started for call, t in finished.items()}
        timer.record("logprobs", max(done.get("policy", 0.0), done.get("reference_logprobs", 0.0)))
        timer.record("critic", done.get("values", 0.0))
        timer.record("reward", done["scores"])

    @staticmethod
    def _inference_results(
        answers: dict[str, list], shape: tuple[int, int], annotated: AnnotatedBatch | None
    ) -> InferenceResults:
        """Join the replicas' answers and cut the annotated rows (CARFT) from the on-policy ones."""
        joined = {call: concat_rows(parts) for call, parts in answers.items()}
        results = InferenceResults(policy=joined["policy"], scored=joined["scores"], critic=joined.get("values"))
        if "reference_logprobs" in joined:
            results.reference_logprobs = joined["reference_logprobs"]["logprobs"]
        if annotated is not None:
            (rows, width), ann_width = shape, annotated.tokens.shape[1]
            results.policy, results.policy_annotated = split_annotated_outputs(results.policy, rows, width, ann_width)
            if results.critic is not None:
                results.critic, results.critic_annotated = split_annotated_outputs(
                    results.critic, rows, width, ann_width
                )
        return results

    def make_experience(self, sample_q: list[int], rollout: Rollout, timer: PhaseTimer) -> tuple[Experience, dict]:
        """Everything the updates need, plus step metrics (runs the overlapped inference phase)."""
        annotated = None
        if self.cfg.contrastive.enabled:
            annotated = AnnotatedBatch.build([self.train_annotated[q] for q in sample_q], self.tokenizer.pad_token_id)
        results = self.infer(sample_q, rollout, annotated, timer)
        return build_experience(rollout.to_batch(self.tokenizer.pad_token_id), annotated, results, self.settings)

    def update(self, step: int, exp: Experience, timer: PhaseTimer) -> dict[str, float]:
        """The actor's and the critic's epochs over the experience, in parallel."""
        cfg, calls = self.cfg, {}
        with timer.phase("training"):
            if step >= cfg.rl.critic_warmup_steps:
                batch = exp.actor_batch(with_value_targets=cfg.uses_shared_value_head)
                calls["actor"] = self.groups["actor"].submit_rows(
                    PolicyWorker.train, (batch,), self._actor_train_settings(step)
                )
            if cfg.uses_critic_group:
                calls["critic"] = self.groups["critic"].submit_rows(
                    ValueWorker.train, (exp.critic_batch(),), self._critic_train_settings(step)
                )
            answers = self._wait(calls)
        return train_metrics(
            answers["actor"][0] if "actor" in answers else None, answers["critic"][0] if "critic" in answers else None
        )

    def _actor_train_settings(self, step: int) -> ActorTrainSettings:
        cfg, loop = self.cfg, self.cfg.rl
        drgrpo = loop.advantage_estimator == "drgrpo"
        return ActorTrainSettings(
            epochs=loop.ppo_epochs,
            mini_batch_rows=loop.mini_batch_size // self.dps["actor"],
            seed=derive_seed(loop.seed, "actor_minibatch_order", step),
            clip_ratio=loop.clip_ratio,
            temperature=cfg.generation.temperature,
            constant_normalizer=drgrpo_normalizer(loop.mini_batch_size, cfg.generation.max_new_tokens)
            if drgrpo
            else 0.0,
            shared_value=cfg.uses_shared_value_head,
            value_clip=cfg.critic.value_clip,
            value_loss_coef=cfg.critic.value_loss_coef,
            contrastive=self.settings.contrastive,
            probe_gradients=self._probes_gradients(step),
            lr_scale=self._lr_scale,
        )

    def _probes_gradients(self, step: int) -> bool:
        every = self.cfg.contrastive.diagnostics_every if self.cfg.contrastive.enabled else 0
        return bool(every) and step % every == 0

    def _critic_train_settings(self, step: int) -> CriticTrainSettings:
        loop = self.cfg.rl
        return CriticTrainSettings(
            epochs=loop.ppo_epochs,
            mini_batch_rows=loop.mini_batch_size // self.dps["critic"],
            seed=derive_seed(loop.seed, "critic_minibatch_order", step),
            value_clip=self.cfg.critic.value_clip,
            lr_scale=self._lr_scale,
        )

    @property
    def _lr_scale(self) -> float:
        return self.guard.state.lr_scale if self.guard is not None else 1.0

    # ------------------------------------------------------------------ the loop's hooks

    def train_step(self, step: int) -> dict[str, float]:
        """One rollout + update round (the module docstring's step); returns its metrics."""
        timer = PhaseTimer()
        with timer.phase("generation"):
            sample_q, rollout = self.generate(step)
        exp, metrics = self.make_experience(sample_q, rollout, timer)
        metrics.update(self.update(step, exp, timer))
        metrics.update(timer.metrics())
        self.rewards.append(metrics["reward"])
        return metrics

    def evaluate(self, done: int, name: str) -> tuple[EvalResult, PairedChange | None]:
        """Greedy held-out accuracy of the current policy, recorded under ``eval/<name>_*``."""
        timer = PhaseTimer()
        gen_cfg = dataclasses.replace(
            self.cfg.eval_generation,
            eos_token_ids=(self.tokenizer.eos_token_id,),
            pad_token_id=self.tokenizer.pad_token_id,
        )
        call = self.groups["actor"].submit(PolicyWorker.evaluate, self.eval_examples, self.eval_prompts, gen_cfg)
        got = self._await({"actor": call})["actor"][0]
        summary = got["summary"]
        result = EvalResult(
            summary["accuracy"], None, summary["num_examples"], summary["mean_response_tokens"], got["records"]
        )
        change = record_eval(result, self.out / "eval", name, done, self.logger, timer.elapsed())
        if name == "before" and self.guard is not None and self.guard.state.best_step is None:
            self.guard.record_best(0, result.accuracy)  # the start: rebuilt from the SFT checkpoint (load)
        return result, change

    def save(self, done: int) -> None:
        """Every role's checkpoint of step ``done``, then prune to the newest steps complete for all."""
        timer = PhaseTimer()
        metadata = {"stage": self.cfg.method, "model": dataclasses.asdict(self.model_cfg)}
        root = str(self.ckpt_roots["actor"])
        calls = {"actor": self.groups["actor"].submit(PolicyWorker.save, root, done, {"step": done}, metadata)}
        if "critic" in self.ckpt_roots:
            calls["critic"] = self.groups["critic"].submit(ValueWorker.save, str(self.ckpt_roots["critic"]), done)
        self._await(calls)
        best = self.guard.state.best_step if self.guard is not None else None
        prune_checkpoints(list(self.ckpt_roots.values()), self.cfg.rl.keep_checkpoints, protect=[best] if best else [])
        LOG.info("checkpoint step %d saved in %.1f s", done, timer.elapsed())

    def after_step(
        self, done: int, metrics: dict[str, float], evaluation: tuple[EvalResult, Any] | None, saved: bool
    ) -> Rewind | None:
        """The collapse guard's turn (rl/collapse_guard.py): keep a checkpoint of each new best
        evaluation, and when a rule fires return every role to the best one."""
        if self.guard is None:
            return None
        accuracy = evaluation[0].accuracy if evaluation is not None else None
        if accuracy is not None and self.guard.is_new_best(accuracy):
            if not saved:
                self.save(done)  # the guard may return here: it must be a complete checkpoint
            self.guard.record_best(done, accuracy)
        trigger = self.guard.check(done, metrics, accuracy)
        if trigger is None:
            return None
        if self.guard.state.best_step is None:
            LOG.warning("collapse guard: %s (%s); no checkpoint to return to yet", trigger.rule, trigger.detail)
            return None
        return self._roll_back(done, trigger)

    def _roll_back(self, done: int, trigger: Trigger) -> Rewind:
        """Every role back to the guard's best checkpoint (newer ones deleted), the event logged."""
        event = self.guard.record_event(done, trigger)
        target = event["to_step"]
        discard_checkpoints_after(list(self.ckpt_roots.values()), target)
        self.load(target)
        self.logger.log(done, {"guard/rollback_to": float(target), "guard/lr_scale": event["lr_scale"]})
        if event["action"] == "stop":
            reason = (
                f"collapse guard: {trigger.rule} ({trigger.detail}) after {self.guard.state.rollbacks} rollbacks "
                f"(rl.collapse_guard.max_rollbacks); stopped at the best checkpoint, step {target}"
            )
            LOG.error("%s", reason)
            return Rewind(target, stop=True, reason=reason)
        LOG.warning(
            "collapse guard: %s at step %d (%s); rolled back to step %d (held-out %.1f%%), learning rate x%g",
            trigger.rule,
            done,
            trigger.detail,
            target,
            100 * event["best_accuracy"],
            event["lr_scale"],
        )
        return Rewind(target)

    def resume(self) -> int:
        """Load the newest step complete for every role (0: none)."""
        step = max(common_steps(list(self.ckpt_roots.values())), default=0)
        if step == 0:
            return 0
        self.load(step)
        LOG.info("resumed from %s (step %d)", self.ckpt_roots["actor"] / f"step_{step}", step)
        return step

    def load(self, step: int) -> None:
        """Every role's checkpoint of step ``step`` (the data position is a function of the step);
        step 0 is the start: the model groups are set up again from the SFT checkpoint (fresh
        optimizers and heads), as a checkpoint saved before any update would hold no optimizer state."""
        if step == 0:
            calls = {"actor": self.groups["actor"].submit(ActorWorker.setup, self._actor_spec())}
            if self.cfg.uses_critic_group:
                calls["critic"] = self.groups["critic"].submit(CriticWorker.setup, self._critic_spec())
            self._await(calls)
            return
        calls = {
            "actor": self.groups["actor"].submit(PolicyWorker.load, str(self.ckpt_roots["actor"] / f"step_{step}"))
        }
        if "critic" in self.ckpt_roots:
            path = str(self.ckpt_roots["critic"] / f"step_{step}")
            calls["critic"] = self.groups["critic"].submit(ValueWorker.load, path)
        self._await(calls)

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, Any]:
        """Start the workers, run the loop (resuming if a checkpoint exists), write summary.json."""
        cfg = self.cfg
        try:
            self.start_workers()
            start = self.resume()
            self.logger = RunLogger(
                self.out,
                cfg.method,
                enabled=True,
                total_steps=cfg.rl.steps,
                start_step=start,
                settings=cfg.logging,
                run_config=dataclasses.asdict(cfg),
            )
            outcome = run_loop(cfg.rl, self, self.logger, start=start, evaluate_before=cfg.rl.eval_before)
        except WorkerFailure as err:
            LOG.error(
                "%s; the newest complete checkpoint under %s is usable: rerun the same command to resume",
                err,
                self.out / "checkpoints",
            )
            raise
        finally:
            if self.logger is not None:
                self.logger.close()  # no progress bar redrawn after the error line at exit
            self.stop_workers()
        return self._write_summary(outcome)

    def _write_summary(self, outcome: LoopOutcome) -> dict[str, Any]:
        cfg = self.cfg
        summary = {
            "method": cfg.method,
            "steps": outcome.steps,
            "stopped_early": outcome.stopped_early,
            "stop_reason": outcome.stop_reason,
            "final_checkpoint": str(self.ckpt_roots["actor"]),
            **held_out_summary(outcome.final_evaluation, self.out / "eval"),
            "reward_first_steps": _mean(self.rewards[:5]),
            "reward_last_steps": _mean(self.rewards[-5:]),
            "wall_time_s": self.timer.elapsed(),
        }
        if self.guard is not None:
            summary["collapse_guard"] = self.guard.summary()
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def run_rl(cfg: RLConfig) -> dict[str, Any]:
    """Run (or resume) an RL stage as configured; returns its summary (also summary.json)."""
    return RLRun(cfg).run()


__all__ = ["RLRun", "check_layouts", "experience_settings", "model_groups", "resolve_sft", "run_rl", "worker_cpus"]
