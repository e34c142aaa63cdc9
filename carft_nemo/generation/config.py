"""Sampling settings for rollouts and evaluation, validated when built."""

from __future__ import annotations

from dataclasses import dataclass

from carft_nemo.config import require


@dataclass
class GenerationConfig:
    """How to continue a batch of prompts.

    The sampling distribution at each step is softmax(l / T) restricted to the top-k tokens
    and then to the smallest prefix of them whose mass reaches ``top_p`` (the nucleus),
    renormalised. ``greedy`` takes its mode instead of a sample; the returned log-probs are
    always those of the chosen token under that distribution.
    """

    max_new_tokens: int = 256  # per sequence, also capped by the model's max sequence length
    greedy: bool = False  # argmax instead of sampling
    temperature: float = 1.0  # T in softmax(l / T); > 0
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # nucleus mass in (0, 1]; 1 = off
    eos_token_ids: tuple[int, ...] = ()  # any of these ends a sequence
    pad_token_id: int = 0  # fills the right-padded tensors of a Rollout
    seed: int = 0  # same seed, prompts and layout -> same samples
    micro_batch_size: int = 0  # prompts per static batch (sorted by length); 0 = all at once
    # torch intra-op threads while generating on CPU (restored after); 0 = leave torch's setting.
    # Decode steps are [b, h] x [h, h'] matmuls too small to split, and an OpenMP thread whose
    # partner is descheduled spins: on a loaded host more threads were several times slower than
    # one (python -m benchmarks.generation). Ignored on GPU.
    cpu_threads: int = 1

    def __post_init__(self) -> None:
        require(
            isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
            "max_new_tokens",
            f"must be an integer >= 1, got {self.max_new_tokens!r}",
        )
        require(
            float(self.temperature) > 0,
            "temperature",
            f"must be > 0 (use greedy=true for argmax), got {self.temperature!r}",
        )
        require(
            isinstance(self.top_k, int) and self.top_k >= 0,
            "top_k",
            f"must be an integer >= 0 (0 = off), got {self.top_k!r}",
        )
        require(0.0 < float(self.top_p) <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.eos_token_ids, int):
            self.eos_token_ids = (self.eos_token_ids,)
        self.eos_token_ids = tuple(int(t) for t in self.eos_token_ids)
        require(
            all(t >= 0 for t in self.eos_token_ids),
            "eos_token_ids",
            f"must be non-negative token ids, got {self.eos_token_ids!r}",
        )
        require(
            isinstance(self.pad_token_id, int) and self.pad_token_id >= 0,
            "pad_token_id",
            f"must be a non-negative token id, got {self.pad_token_id!r}",
        )
        require(
            isinstance(self.micro_batch_size, int) and self.micro_batch_size >= 0,
            "micro_batch_size",
            f"must be an integer >= 0, got {self.micro_batch_size!r}",
        )
        require(
            isinstance(self.cpu_threads, int) and self.cpu_threads >= 0,
            "cpu_threads",
            f"must be an integer >= 0 (0 = torch's setting), got {self.cpu_threads!r}",
        )
        self.temperature = float(self.temperature)
        self.top_p = float(self.top_p)
