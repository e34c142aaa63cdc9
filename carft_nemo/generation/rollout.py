"""What generation returns: per-sample ids and log-probs, and the padded training view."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RolloutBatch:
    """Right-padded tensors for training; ``B`` samples, ``S`` = longest prompt+response.

    Column ``t`` of ``logprobs`` is log p(tokens[:, t] | tokens[:, :t]) under the sampling
    distribution (0 outside responses), so it lines up with ``token_logprobs(logits[:, :-1],
    tokens[:, 1:])`` as ``logprobs[:, 1:]`` masked by ``response_mask[:, 1:]``.
    """

    tokens: torch.Tensor  # [B, S] long: prompt, response, then pad_token_id
    attention_mask: torch.Tensor  # [B, S] bool: True on prompt and response tokens
    response_mask: torch.Tensor  # [B, S] bool: True on generated tokens (EOS included)
    logprobs: torch.Tensor  # [B, S] float32: sampling log-probs at response positions, else 0
    prompt_lengths: torch.Tensor  # [B] long
    response_lengths: torch.Tensor  # [B] long
    finished: torch.Tensor  # [B] bool: the response ends with an EOS token


@dataclass(frozen=True)
class Rollout:
    """Generated continuations of a batch of prompts, in the prompts' order.

    ``finished[i]`` is True when response ``i`` stopped at an EOS token (kept as its last
    token, with its log-prob); False when it hit ``max_new_tokens`` or the model's length.
    """

    prompts: list[list[int]]
    responses: list[list[int]]
    logprobs: list[list[float]]  # one per response token, under the sampling distribution
    finished: list[bool]

    def __post_init__(self) -> None:
        sizes = {len(self.prompts), len(self.responses), len(self.logprobs), len(self.finished)}
        if len(sizes) != 1:
            raise ValueError(f"Rollout fields disagree on the batch size: {sorted(sizes)}")
        for i, (r, lp) in enumerate(zip(self.responses, self.logprobs)):
            if len(r) != len(lp):
                raise ValueError(f"Rollout sample {i}: {len(r)} response tokens but {len(lp)} log-probs")

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(r) for r in self.responses)

    def to_batch(self, pad_token_id: int = 0) -> RolloutBatch:
        """Right-pad prompt+response to ``[B, S]`` with the masks described in :class:`RolloutBatch`."""
        B = len(self)
        lengths = [len(p) + len(r) for p, r in zip(self.prompts, self.responses)]
        S = max(lengths, default=0)
        tokens = torch.full((B, S), pad_token_id, dtype=torch.long)
        attention = torch.zeros(B, S, dtype=torch.bool)
        response = torch.zeros(B, S, dtype=torch.bool)
        logprobs = torch.zeros(B, S, dtype=torch.float32)
        for i, (p, r, lp) in enumerate(zip(self.prompts, self.responses, self.logprobs)):
            n, m = len(p), len(r)
            tokens[i, : n + m] = torch.tensor(p + r, dtype=torch.long)
            attention[i, : n + m] = True
            response[i, n : n + m] = True
            logprobs[i, n : n + m] = torch.tensor(lp, dtype=torch.float32)
        return RolloutBatch(
            tokens=tokens,
            attention_mask=attention,
            response_mask=response,
            logprobs=logprobs,
            prompt_lengths=torch.tensor([len(p) for p in self.prompts], dtype=torch.long),
            response_lengths=torch.tensor([len(r) for r in self.responses], dtype=torch.long),
            finished=torch.tensor(self.finished, dtype=torch.bool),
        )
