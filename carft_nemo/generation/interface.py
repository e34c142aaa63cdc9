"""The one interface rollout code sees; backends (megatron now, vLLM later) implement it."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from carft_nemo.generation.config import GenerationConfig
from carft_nemo.generation.rollout import Rollout


@runtime_checkable
class Generator(Protocol):
    """Continue token-id prompts; every rank of one model replica returns the same Rollout."""

    def generate(self, prompts: list[list[int]], cfg: GenerationConfig) -> Rollout:
        """Continuations of ``prompts`` (any lengths) under ``cfg``, in the prompts' order."""
        ...
