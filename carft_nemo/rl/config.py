"""Typed configuration of the RL stages (ReFT's PPO, CARFT, Dr.GRPO), validated at start-up.

One schema serves the three methods: ``algorithm: ppo`` with ``contrastive.enabled: false``
is ReFT, with ``contrastive.enabled: true`` it is CARFT, and ``algorithm: grpo`` is Dr.GRPO
(no critic). Every role (actor, critic, reference, reward) has its own parallel layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from carft_nemo.algorithms.contrastive.config import ContrastiveConfig
from carft_nemo.config import key_prefix, require
from carft_nemo.data.datasets import DatasetConfig, held_out_split
from carft_nemo.data.packing import PackingConfig, check_budget
from carft_nemo.data.tokenization import EncodingConfig
from carft_nemo.distributed.layout import ParallelConfig, check_sequence_room
from carft_nemo.distributed.placement import check_role_nodes
from carft_nemo.generation.config import GenerationConfig
from carft_nemo.models.config import ModelConfig, check_context_window
from carft_nemo.planning.plan import ClusterConfig
from carft_nemo.rewards.sandbox import SandboxConfig
from carft_nemo.rl.collapse_guard import CollapseGuardConfig
from carft_nemo.telemetry.run_log import LoggingConfig
from carft_nemo.training.loop import LoopSchedule
from carft_nemo.training.optim import OptimConfig

LONGEST_SEQUENCE_KEYS = "encoding.max_total_tokens, or encoding.max_prompt_tokens + generation.max_new_tokens"

CRITIC_LAYOUTS = ("separate", "shared")
REFERENCE_MODES = ("swap", "group")


def _rl_optim() -> OptimConfig:
    return OptimConfig(lr=3e-7, schedule="constant", clip_grad=1.0)


@dataclass
class ActorConfig:
    """The policy group: training, generation, old/ref log-probs."""

    num_workers: int = 1  # ranks (GPUs) of the group: tensor x pipeline x data parallel
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=_rl_optim)
    micro_batch_size: int = 8  # sequences per forward/backward micro-batch
    packing: PackingConfig = field(default_factory=PackingConfig)  # rows packed into bins (carft_nemo.data.packing)
    cpu_threads: int = 1  # torch threads per worker process on CPU (several workers share the cores)
    # Cluster nodes its ranks fill in order (0 = the job's first); [] = Ray's choice (distributed/placement.py).
    nodes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        require(self.num_workers >= 1, "num_workers", f"must be >= 1, got {self.num_workers}")
        require(self.micro_batch_size >= 1, "micro_batch_size", f"must be >= 1, got {self.micro_batch_size}")
        require(self.cpu_threads >= 1, "cpu_threads", f"must be >= 1, got {self.cpu_threads}")
        check_role_nodes(self.nodes, self.num_workers)


@dataclass
class CriticConfig:
    """The value model: a separate server group, or a head on the policy backbone.

    ``layout: separate`` (default at scale): its own model, initialised from the SFT
    checkpoint with a fresh value head, with infer / train / save calls and its own layout.
    ``layout: shared``: ReFT's and CARFT's code, a value head on the policy's final hidden
    states trained with the policy loss (``value_loss_coef`` 5 in the paper's code).
    """

    layout: str = "separate"
    num_workers: int = 1
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=_rl_optim)
    micro_batch_size: int = 8
    packing: PackingConfig = field(default_factory=PackingConfig)
    value_loss_coef: float = 1.0  # weight of the value loss (shared layout; the separate critic trains on it alone)
    value_clip: float = 0.2
    cpu_threads: int = 1
    nodes: list[int] = field(default_factory=list)  # separate layout only: as actor.nodes

    def __post_init__(self) -> None:
        require(self.layout in CRITIC_LAYOUTS, "layout", f"must be one of {CRITIC_LAYOUTS}, got {self.layout!r}")
        require(self.num_workers >= 1, "num_workers", f"must be >= 1, got {self.num_workers}")
        require(self.micro_batch_size >= 1, "micro_batch_size", f"must be >= 1, got {self.micro_batch_size}")
        require(self.value_loss_coef >= 0, "value_loss_coef", f"must be >= 0, got {self.value_loss_coef}")
        require(self.value_clip > 0, "value_clip", f"must be > 0, got {self.value_clip}")
        require(self.cpu_threads >= 1, "cpu_threads", f"must be >= 1, got {self.cpu_threads}")
        require(
            not self.nodes or self.layout == "separate",
            "nodes",
            "places the separate critic's ranks; with layout: shared the value head runs on the actor's",
        )
        check_role_nodes(self.nodes, self.num_workers)


@dataclass
class ReferenceConfig:
    """Where the frozen SFT policy for the KL penalty lives.

    ``swap``: its weights stay in the actor's CPU memory and are swapped in for the
    reference pass (no extra GPUs; NeMo-Aligner's default). ``group``: its own Ray group
    with its own ``parallel`` layout, running concurrently with the actor.
    """

    mode: str = "swap"
    num_workers: int = 1  # group mode only
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # group mode only
    nodes: list[int] = field(default_factory=list)  # group mode only: as actor.nodes

    def __post_init__(self) -> None:
        require(self.num_workers >= 1, "num_workers", f"must be >= 1, got {self.num_workers}")
        require(self.mode in REFERENCE_MODES, "mode", f"must be one of {REFERENCE_MODES}, got {self.mode!r}")
        require(
            not self.nodes or self.mode == "group",
            "nodes",
            "places the reference group's ranks; with mode: swap the reference lives in the actor's host memory",
        )
        check_role_nodes(self.nodes, self.num_workers)


@dataclass
class RewardServerConfig:
    """The reward pool: answer checking and the P-CoT sandbox; scales by adding workers."""

    num_workers: int = 1
    tolerance: float = 1e-2
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    nodes: list[int] = field(default_factory=list)  # as actor.nodes

    def __post_init__(self) -> None:
        require(self.num_workers >= 1, "num_workers", f"must be >= 1, got {self.num_workers}")
        require(self.tolerance >= 0, "tolerance", f"must be >= 0, got {self.tolerance}")
        check_role_nodes(self.nodes, self.num_workers)


# Each algorithm with the advantage estimator it uses (carft_nemo.algorithms.advantages).
ALGORITHM_ESTIMATORS = {"ppo": "gae", "grpo": "drgrpo"}
ALGORITHMS = tuple(ALGORITHM_ESTIMATORS)


@dataclass
class RLLoopConfig(LoopSchedule):
    """The schedule (:class:`LoopSchedule`: steps = rollout + update rounds, evaluation,
    checkpoints, seed) plus rollout, advantage and update settings (ReFT's PPO defaults;
    ``algorithm: grpo`` for Dr.GRPO)."""

    algorithm: str = "ppo"
    questions_per_step: int = 32  # distinct training questions per rollout
    samples_per_question: int = 1  # n (ReFT 1; Dr.GRPO's group size G, default 8 in its configs)
    ppo_epochs: int = 2  # passes over each rollout
    mini_batch_size: int = 32  # samples per optimizer step (global); rollout size must be a multiple
    kl_coef: float = 0.05  # per-token KL to the reference inside the reward (ReFT: 0.05 N-CoT, 0.01 P-CoT)
    gamma: float = 1.0
    lam: float = 0.95
    clip_ratio: float = 0.2
    whiten_advantages: bool = True  # across the whole rollout batch (all data-parallel ranks)
    # The first N rounds train only the separate critic (its fresh value head starts at 0), so
    # the policy's first updates already get per-token credit from values that mean something.
    critic_warmup_steps: int = 0
    # ReFT scores a response that hit the length limit without EOS like any other (its text
    # usually has no answer line -> 0). A number here overrides that score instead.
    unfinished_score: float | None = None
    call_timeout_s: float = 3600.0  # a worker call taking longer than this stops the run (no silent hang)
    collapse_guard: CollapseGuardConfig = field(default_factory=CollapseGuardConfig)  # rl/collapse_guard.py

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.algorithm in ALGORITHMS, "algorithm", f"must be one of {ALGORITHMS}, got {self.algorithm!r}")
        for name in ("questions_per_step", "samples_per_question", "ppo_epochs", "mini_batch_size"):
            require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("kl_coef", "critic_warmup_steps"):
            require(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        require(0 < self.gamma <= 1, "gamma", f"must be in (0, 1], got {self.gamma}")
        require(0 <= self.lam <= 1, "lam", f"must be in [0, 1], got {self.lam}")
        require(self.clip_ratio > 0, "clip_ratio", f"must be > 0, got {self.clip_ratio}")
        require(self.call_timeout_s > 0, "call_timeout_s", f"must be > 0, got {self.call_timeout_s}")
        require(
            self.rollout_size % self.mini_batch_size == 0,
            "mini_batch_size",
            f"rollout size questions_per_step*samples_per_question = {self.rollout_size} must be a "
            f"multiple of mini_batch_size={self.mini_batch_size}",
        )
        if self.algorithm == "grpo":
            require(
                self.samples_per_question >= 2,
                "samples_per_question",
                "Dr.GRPO needs a group of >= 2 samples per question",
            )

    @property
    def advantage_estimator(self) -> str:
        """The name of this algorithm's estimator in ``carft_nemo.algorithms.advantages``."""
        return ALGORITHM_ESTIMATORS[self.algorithm]

    @property
    def rollout_size(self) -> int:
        return self.questions_per_step * self.samples_per_question

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps of the whole run: the unit of ``optim.warmup_steps`` / ``decay_steps``."""
        return self.steps * self.ppo_epochs * (self.rollout_size // self.mini_batch_size)


def _rl_generation() -> GenerationConfig:
    return GenerationConfig(max_new_tokens=96, temperature=1.0, micro_batch_size=64)


@dataclass
class RLConfig:
    """An RL stage from an SFT checkpoint: ``recipes/rl.py --config configs/{reft,carft,grpo}-*.yaml``."""

    output_dir: str = "outputs/rl"
    sft_checkpoint: str = ""  # SFT output dir (holds checkpoints/ and tokenizer/) or a step_N folder
    tokenizer_path: str | None = None  # default: <sft output dir>/tokenizer
    model: ModelConfig = field(default_factory=ModelConfig)  # default: the SFT checkpoint's model
    actor: ActorConfig = field(default_factory=ActorConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    reward: RewardServerConfig = field(default_factory=RewardServerConfig)
    contrastive: ContrastiveConfig = field(default_factory=lambda: ContrastiveConfig(enabled=False))
    encoding: EncodingConfig = field(
        default_factory=lambda: EncodingConfig(max_prompt_tokens=128, max_total_tokens=256)
    )
    train_data: DatasetConfig = field(default_factory=DatasetConfig)
    eval_data: DatasetConfig = field(default_factory=held_out_split)
    generation: GenerationConfig = field(default_factory=_rl_generation)
    eval_generation: GenerationConfig = field(
        default_factory=lambda: GenerationConfig(max_new_tokens=96, greedy=True, micro_batch_size=64)
    )
    rl: RLLoopConfig = field(default_factory=RLLoopConfig)
    ray_address: str | None = None  # an existing Ray cluster; default: start one on this host
    logging: LoggingConfig = field(default_factory=LoggingConfig)  # W&B besides TensorBoard (telemetry/)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)  # GPU memory for the start-up plan (planning/)

    @property
    def longest_sequence(self) -> int:
        """The longest prompt + response this run can produce (:data:`LONGEST_SEQUENCE_KEYS`)."""
        return max(self.encoding.max_total_tokens, self.encoding.max_prompt_tokens + self.generation.max_new_tokens)

    def __post_init__(self) -> None:
        require(bool(self.output_dir), "output_dir", "must be set")
        require(self.train_data.split == "train", "train_data.split", "must be 'train'")
        require(not self.generation.greedy, "generation.greedy", "rollouts must sample (set greedy: false)")
        longest, where = self.longest_sequence, LONGEST_SEQUENCE_KEYS
        for role in ("actor", "critic"):
            with key_prefix(role):
                check_budget(getattr(self, role).packing, longest, where)
        for role in ("actor", "critic", "reference"):
            with key_prefix(role):
                check_sequence_room(getattr(self, role).parallel, longest, where)
        check_context_window(self.model, longest, where)
        if self.rl.algorithm == "grpo":
            require(
                not self.contrastive.enabled,
                "contrastive.enabled",
                "the contrastive signal needs a critic's values; it is not defined for Dr.GRPO",
            )
        if self.rl.critic_warmup_steps:
            require(
                self.uses_critic_group,
                "rl.critic_warmup_steps",
                "needs PPO with a separate critic (critic.layout: separate): a shared value head trains "
                "with the policy",
            )
            require(
                self.rl.critic_warmup_steps < self.rl.steps,
                "rl.critic_warmup_steps",
                f"{self.rl.critic_warmup_steps} warm-up rounds leave none of rl.steps={self.rl.steps} to the policy",
            )

    @property
    def uses_critic_group(self) -> bool:
        return self.rl.algorithm == "ppo" and self.critic.layout == "separate"

    @property
    def uses_reference_group(self) -> bool:
        """The frozen SFT policy runs as its own group (else, with a KL, it is swapped into the actor)."""
        return self.reference.mode == "group" and self.rl.kl_coef > 0

    @property
    def uses_shared_value_head(self) -> bool:
        return self.rl.algorithm == "ppo" and self.critic.layout == "shared"

    @property
    def method(self) -> str:
        """Name used in reports: reft, carft or grpo."""
        if self.rl.algorithm == "grpo":
            return "grpo"
        return "carft" if self.contrastive.enabled else "reft"
