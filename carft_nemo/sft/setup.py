"""Start-up steps of SFT: the tokenizer on every rank, the policy model group."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from carft_nemo.data.records import Example
from carft_nemo.data.tokenization import TokenizerConfig, get_tokenizer, load_tokenizer
from carft_nemo.distributed.layout import ParallelConfig
from carft_nemo.generation.megatron import MegatronGenerator
from carft_nemo.models.config import ModelConfig
from carft_nemo.models.gpt import build_gpt_model
from carft_nemo.training.optim import OptimConfig, TrainableModel, make_trainable


def prepare_tokenizer(cfg: TokenizerConfig, examples: Sequence[Example], out_dir: str | Path) -> Any:
    """Load the configured tokenizer, or train one on rank 0 (others wait, then load it).

    An existing trained tokenizer in ``out_dir`` is reused, so a resumed run keeps its ids.
    """
    out_dir = Path(out_dir)
    if cfg.path is not None:
        return load_tokenizer(cfg.path)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and not (out_dir / "tokenizer.json").is_file():
        get_tokenizer(cfg, examples, out_dir)
    if dist.is_initialized():
        dist.barrier()
    return load_tokenizer(out_dir)


@dataclass
class PolicyGroup:
    """This rank's part of the policy: the trainable model, its config and a generator."""

    model_cfg: ModelConfig
    parallel: ParallelConfig
    trainable: TrainableModel

    def generator(self, vocab_size: int) -> MegatronGenerator:
        return MegatronGenerator(self.trainable.model, vocab_size=vocab_size)


def build_policy(
    model_cfg: ModelConfig,
    parallel: ParallelConfig,
    optim: OptimConfig,
    total_steps: int,
    *,
    init_from_hf: str | None = None,
    value_head: bool = False,
) -> PolicyGroup:
    """Build the model for this rank's stage/shard, load HF weights if asked, wrap for training."""
    gpt = build_gpt_model(model_cfg, parallel, value_head=value_head)
    if init_from_hf:
        from carft_nemo.checkpoint.hf_io import import_hf

        import_hf([gpt], init_from_hf, model_cfg)
    return PolicyGroup(model_cfg, parallel, make_trainable(gpt, model_cfg, parallel, optim, total_steps))
