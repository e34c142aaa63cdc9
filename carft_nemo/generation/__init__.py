"""Rollout generation: one small interface (:class:`Generator`) and its megatron backend."""

from carft_nemo.generation.config import GenerationConfig
from carft_nemo.generation.interface import Generator
from carft_nemo.generation.rollout import Rollout, RolloutBatch
from carft_nemo.generation.sampling import choose_tokens, filter_logits, sampling_log_probs

__all__ = [
    "GenerationConfig",
    "Generator",
    "Rollout",
    "RolloutBatch",
    "choose_tokens",
    "filter_logits",
    "sampling_log_probs",
    "MegatronGenerator",
]


def __getattr__(name: str):
    # The megatron backend imports megatron (~3 s); load it only when asked for.
    if name == "MegatronGenerator":
        from carft_nemo.generation.megatron import MegatronGenerator

        return MegatronGenerator
    raise AttributeError(name)
