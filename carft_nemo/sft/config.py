"""Typed configuration of the SFT stage, validated at start-up."""

from __future__ import annotations

from dataclasses import dataclass, field

from carft_nemo.config import key_prefix, require
from carft_nemo.data.datasets import DatasetConfig, held_out_split
from carft_nemo.data.packing import PackingConfig, check_budget
from carft_nemo.data.tokenization import EncodingConfig, TokenizerConfig
from carft_nemo.distributed.layout import ParallelConfig, check_model_layout, check_sequence_room
from carft_nemo.generation.config import GenerationConfig
from carft_nemo.models.config import ModelConfig, check_context_window
from carft_nemo.planning.plan import ClusterConfig
from carft_nemo.telemetry.run_log import LoggingConfig
from carft_nemo.training.loop import LoopSchedule
from carft_nemo.training.optim import OptimConfig


@dataclass
class SFTLoopConfig(LoopSchedule):
    """The schedule (:class:`LoopSchedule`: steps, evaluation, checkpoints, seed) plus the batch."""

    global_batch_size: int = 32
    micro_batch_size: int = 8
    packing: PackingConfig = field(default_factory=PackingConfig)  # rows packed into bins (carft_nemo.data.packing)
    pad_to_multiple_of: int = 8
    vote_k: int = 1  # > 1: also majority-vote accuracy over k samples at each evaluation

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("global_batch_size", "micro_batch_size", "pad_to_multiple_of", "vote_k"):
            require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        require(
            self.global_batch_size % self.micro_batch_size == 0,
            "global_batch_size",
            f"{self.global_batch_size} is not a multiple of micro_batch_size={self.micro_batch_size}",
        )


def _sft_optim() -> OptimConfig:
    return OptimConfig(lr=1e-3, warmup_steps=20, min_lr=1e-4)


def _prompt_budget() -> EncodingConfig:
    return EncodingConfig(max_prompt_tokens=128, max_total_tokens=256)


def _greedy_eval() -> GenerationConfig:
    return GenerationConfig(max_new_tokens=96, greedy=True, micro_batch_size=64)


@dataclass
class SFTConfig:
    """The SFT recipe: ``recipes/sft.py --config configs/sft-*.yaml``."""

    output_dir: str = "outputs/sft"
    init_from_hf: str | None = None  # local HF folder (config.json + safetensors) to start from
    model: ModelConfig = field(default_factory=ModelConfig)  # set model.preset or the fields
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=_sft_optim)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    encoding: EncodingConfig = field(default_factory=_prompt_budget)
    train_data: DatasetConfig = field(default_factory=DatasetConfig)
    eval_data: DatasetConfig = field(default_factory=held_out_split)
    generation: GenerationConfig = field(default_factory=_greedy_eval)
    train: SFTLoopConfig = field(default_factory=SFTLoopConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)  # W&B besides TensorBoard (telemetry/)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)  # GPU memory for the start-up plan (planning/)

    def __post_init__(self) -> None:
        require(bool(self.output_dir), "output_dir", "must be set")
        require(self.train_data.split == "train", "train_data.split", "must be 'train'")
        with key_prefix("train"):
            check_budget(self.train.packing, self.encoding.max_total_tokens, "encoding.max_total_tokens")
        check_sequence_room(self.parallel, self.encoding.max_total_tokens, "encoding.max_total_tokens")
        check_context_window(self.model, self.encoding.max_total_tokens, "encoding.max_total_tokens")


def planning_model(cfg: SFTConfig) -> ModelConfig:
    """The model with a vocabulary to plan memory with (before the tokenizer exists): its own, else
    the trained tokenizer's upper bound (``tokenizer.vocab_size``)."""
    return cfg.model if cfg.model.vocab_size else cfg.model.with_vocab(cfg.tokenizer.vocab_size)


def check_world_layout(cfg: SFTConfig, world_size: int) -> int:
    """Validate the layout against the world size before anything starts; returns DP size."""
    require(not cfg.model.is_unset, "model.preset", "set model.preset (e.g. tiny) or the architecture fields")
    dp = check_model_layout(cfg.parallel, world_size, cfg.model, key="parallel")
    require(
        cfg.train.global_batch_size % (cfg.train.micro_batch_size * dp) == 0,
        "train.global_batch_size",
        f"{cfg.train.global_batch_size} must be a multiple of micro_batch_size*data_parallel = "
        f"{cfg.train.micro_batch_size}*{dp}",
    )
    return dp


__all__ = ["SFTConfig", "SFTLoopConfig", "check_world_layout"]
