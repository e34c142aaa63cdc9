"""The actor: one rank of the policy group (generation, log-probs, PPO / Dr.GRPO / CARFT updates).

Also serves as the reference policy, either inside the actor (``swap``: the SFT weights
stay in CPU memory and are swapped in for the reference pass) or as its own frozen group
(``ActorSpec.optim = None``). With the shared critic layout the value head sits on the
policy backbone and is trained here; with CARFT the contrastive projection too.

Plain class (testable in-process under one torch.distributed group); the controller wraps
it in Ray through :class:`~carft_nemo.distributed.ray_group.RayWorkerGroup`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from carft_nemo.checkpoint.dist_checkpoint import POLICY_GROUP, load_checkpoint, load_model_weights, save_checkpoint
from carft_nemo.data.batch import Batch
from carft_nemo.data.packing import PackingConfig
from carft_nemo.data.records import Example
from carft_nemo.data.tokenization import load_tokenizer
from carft_nemo.distributed import device
from carft_nemo.distributed.layout import ParallelConfig
from carft_nemo.evaluation.runner import evaluate
from carft_nemo.generation.config import GenerationConfig
from carft_nemo.generation.megatron import MegatronGenerator
from carft_nemo.generation.rollout import Rollout
from carft_nemo.models.config import ModelConfig
from carft_nemo.models.forward import unwrap
from carft_nemo.models.gpt import build_gpt_model
from carft_nemo.models.heads import POLICY_HEADS, attach_policy_heads
from carft_nemo.telemetry.run_log import LOG
from carft_nemo.training.optim import OptimConfig, make_trainable
from carft_nemo.workers.actor_loss import ActorTrainSettings, actor_loss, policy_outputs
from carft_nemo.workers.contracts import POLICY_WEIGHTS
from carft_nemo.workers.gradient_probe import contrastive_gradient_probe
from carft_nemo.workers.model_worker import ModelWorker, on_token_positions


@dataclass
class ActorSpec:
    """Everything a policy rank needs to build itself."""

    model: ModelConfig
    parallel: ParallelConfig
    init_checkpoint: str  # SFT checkpoint (root or step_N) holding group "policy"
    tokenizer_path: str
    optim: OptimConfig | None = None  # None: frozen (reference group)
    total_steps: int = 1
    shared_value_head: bool = False
    contrastive_dim: int = 0  # > 0: CARFT projection head of that size
    keep_reference: bool = False  # swap mode: keep the initial weights in CPU memory
    micro_batch_size: int = 8
    packing: PackingConfig = field(default_factory=PackingConfig)
    cpu_threads: int = 1
    temperature: float = 1.0  # the sampling temperature: log-probs are of the sampling distribution


class ActorWorker(ModelWorker):
    """Implements :class:`~carft_nemo.workers.contracts.PolicyWorker` (see it for batch keys and shapes)."""

    def setup(self, spec: ActorSpec) -> dict[str, Any]:
        """Build the policy shard from the SFT checkpoint; see :meth:`PolicyWorker.setup`."""
        self.spec = spec
        self.configure_process(spec.cpu_threads)
        self.tokenizer = load_tokenizer(spec.tokenizer_path)
        self.vocab_size = len(self.tokenizer)
        gpt = build_gpt_model(spec.model, spec.parallel)
        attach_policy_heads(gpt, shared_value_head=spec.shared_value_head, contrastive_dim=spec.contrastive_dim)
        load_model_weights(spec.init_checkpoint, POLICY_GROUP, gpt, skip_prefixes=POLICY_HEADS)
        self.reference_state = None
        if spec.keep_reference:
            self.reference_state = {
                k: v.detach().to("cpu", copy=True)
                for k, v in gpt.state_dict().items()
                if torch.is_tensor(v) and not k.startswith(POLICY_HEADS)
            }
        if spec.optim is not None:
            self.trainable = make_trainable(gpt, spec.model, spec.parallel, spec.optim, spec.total_steps)
            self.model = self.trainable.model
        else:
            self.model = gpt.eval().requires_grad_(False)
        self.generator = MegatronGenerator(self.model, vocab_size=self.vocab_size)
        params = sum(p.numel() for p in gpt.parameters())
        return {"parameters_this_rank": params, "vocab_size": self.vocab_size}

    # ------------------------------------------------------------------ rollout side

    def generate(self, prompts: list[list[int]], cfg: GenerationConfig) -> Rollout:
        """Sample one response per prompt; see :meth:`PolicyWorker.generate`."""
        return self.generator.generate(prompts, cfg)

    def forward(
        self, batch: Batch, *, outputs: tuple[str, ...] = ("logprobs",), weights: str = "policy"
    ) -> dict[str, torch.Tensor] | None:
        """Per-token outputs of this replica's rows; see :meth:`PolicyWorker.forward`."""
        if weights not in POLICY_WEIGHTS:
            raise ValueError(f"weights must be one of {POLICY_WEIGHTS}, got {weights!r}")
        if weights == "reference" and self.reference_state is None:
            raise RuntimeError("reference log-probs asked of an actor built without keep_reference")
        fn = policy_outputs(unwrap(self.model), outputs, self.spec.temperature, self.vocab_size)
        batch = on_token_positions(batch)  # the next-token targets the log-probs score
        if weights == "policy":
            result = self.collect_forward(batch, fn, self.spec.micro_batch_size, hidden_to_loss=True)
        else:
            gpt = unwrap(self.model)
            current = {
                k: v.detach().to("cpu", copy=True) for k, v in gpt.state_dict().items() if k in self.reference_state
            }
            gpt.load_state_dict(self.reference_state, strict=False)
            try:
                result = self.collect_forward(batch, fn, self.spec.micro_batch_size, hidden_to_loss=True)
            finally:
                gpt.load_state_dict(current, strict=False)
        if result is not None and "logprobs" in result:
            result["logprobs"] = result["logprobs"][:, :-1]  # [B, T]: the last position chooses nothing
        return result

    # ------------------------------------------------------------------ training

    def train(self, batch: Batch, settings: ActorTrainSettings) -> dict[str, float]:
        """PPO / Dr.GRPO (+ shared value, + contrastive) epochs; see :meth:`PolicyWorker.train`."""
        gpt = unwrap(self.model)
        dp_group = self.layout.group("dp") if self.layout is not None else None
        cp_group = self.layout.group("cp") if self.layout is not None else None

        def make_loss(mini: dict[str, torch.Tensor], num_micro: int):
            normalizer = (
                settings.constant_normalizer if settings.constant_normalizer else self.global_count(mini["action_mask"])
            )
            dp = self.layout.data_parallel if self.layout is not None else 1
            loss_fn = actor_loss(
                gpt,
                settings,
                self.vocab_size,
                dp_group,
                mean_term_weight=normalizer / (dp * num_micro),
                cp_group=cp_group,
            )
            return loss_fn, normalizer

        batch = on_token_positions(batch)
        probe = self._probe_gradients(batch, settings) if settings.probe_gradients else {}
        totals = self.train_epochs(
            batch,
            epochs=settings.epochs,
            mini_batch_rows=settings.mini_batch_rows,
            micro_batch_size=self.spec.micro_batch_size,
            seed=settings.seed,
            make_loss=make_loss,
            hidden_to_loss=True,
            lr_scale=settings.lr_scale,
        )
        return {**totals, **probe}

    def _probe_gradients(self, batch: Batch, settings: ActorTrainSettings) -> dict[str, float]:
        """The contrastive / policy gradient figures on this replica's first micro-batch (gradient_probe)."""
        if settings.contrastive is None:
            return {}
        if self.layout is not None and (self.layout.pipeline_parallel > 1 or self.layout.context_parallel > 1):
            if not getattr(self, "_probe_warned", False):
                LOG.warning(
                    "contrastive.diagnostics_every: the gradient probe needs pipeline_parallel and "
                    "context_parallel 1; skipped"
                )
                self._probe_warned = True
            return {}
        dev = device.local_device()
        micro = {k: v[: self.spec.micro_batch_size].to(dev) for k, v in batch.items()}
        dp_group = self.layout.group("dp") if self.layout is not None else None
        tp_group = self.layout.group("tp") if self.layout is not None else None
        self.model.train()
        return contrastive_gradient_probe(self.model, micro, settings, self.vocab_size, dp_group, tp_group)

    # ------------------------------------------------------------------ evaluation and state

    def evaluate(self, examples: list[Example], prompts: list[list[int]], cfg: GenerationConfig) -> dict[str, Any]:
        """Greedy held-out accuracy; see :meth:`PolicyWorker.evaluate`."""
        result = evaluate(self.generator, self.tokenizer, examples, prompts, cfg)
        return {"summary": result.summary(), "records": result.records}

    def save(self, root: str, step: int, data_state: dict[str, Any], metadata: dict[str, Any]) -> str:
        """Write ``<root>/step_<step>``; see :meth:`PolicyWorker.save`."""
        return str(
            save_checkpoint(root, step, {POLICY_GROUP: self.trainable}, data_state=data_state, metadata=metadata)
        )

    def load(self, path: str) -> int:
        """Restore a checkpoint; see :meth:`PolicyWorker.load`."""
        return load_checkpoint(path, {POLICY_GROUP: self.trainable}).step


__all__ = ["ActorSpec", "ActorWorker"]
