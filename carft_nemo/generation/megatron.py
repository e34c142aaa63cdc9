"""KV-cached batched generation on megatron-core's GPTModel, tensor- and pipeline-parallel.

Why a direct loop over ``GPTModel.forward(inference_context=StaticInferenceContext(...))``
and not megatron's inference engines: on megatron-core 0.16.1 both engines run on CPU only
with further patches (the dynamic one replaces its flash-attention call), the static engine
allows one sampling setting per batch and treats the tokenizer's ``eod`` as both pad and stop
token, and neither returns log-probs of the tempered/filtered distribution that PPO needs.
The direct loop was also the fastest on CPU (see ../shared/reference/README.md: ~1,650 tok/s
KV-cached vs 223 tok/s full recompute, 4 layers / hidden 256 / batch 8).

Measured against HF ``generate`` on the same weights (``benchmarks/generation.py``, 2 shared
CPU cores, batch 8, 64 new tokens, prompts of 16-48 tokens): 0.17x (tiny) and 0.68x
(small_100m). Per step megatron's static-cache attention is the cost: it stores keys before
RoPE and re-rotates the whole key cache every step (O(S) per step, ~30% of the time),
repeats the cached K/V for GQA, and the unfused local attention runs on CPU; the
teacher-forced steps below add ``max_len - min_len`` steps. On GPU the TE spec and
``flash_decode`` remove most of this; a vLLM backend behind the same interface is the
route for fast rollouts.

Batching prompts of different lengths: prompts are right-padded in one static batch. The
prefill runs up to the shortest prompt; from there every step feeds one column, and rows
whose prompt is longer are teacher-forced with their own tokens until it ends. This keeps
every token at its true position with a plain causal mask, which matters because megatron
applies RoPE by cache offset (``position_ids`` are ignored for RoPE), and during decode it
switches attention to ``no_mask`` (Transformer Engine would then ignore a left-padding mask
on GPU). The teacher-forced steps cost ``max_len - min_len`` extra steps per batch, so
prompts are sorted by length and split into ``micro_batch_size`` groups of similar length.

Parallelism: each step the first pipeline stage embeds the new column, stages pass hidden
states ``[s, b, h]`` with point-to-point send/recv, and the last stage gathers only the last
position's logits over tensor parallel (``[b, V]``, inside megatron's output layer), samples,
then broadcasts ``(token, log-prob)`` to its tensor-parallel group and to every pipeline
stage, so all ranks of a replica hold the same tokens. Data-parallel replicas generate their
own prompts; their sampling seed is offset by the data-parallel rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.inference.contexts import StaticInferenceContext

from carft_nemo.distributed import cpu_compat, device
from carft_nemo.generation.config import GenerationConfig
from carft_nemo.generation.rollout import Rollout
from carft_nemo.generation.sampling import choose_tokens
from carft_nemo.models.forward import unwrap

_DP_SEED_STRIDE = 1_000_003  # a prime: distinct data-parallel ranks get unrelated streams


@dataclass(frozen=True)
class _Replica:
    """Where this rank sits in its model replica (read once from megatron's parallel state)."""

    tp_size: int
    pp_size: int
    dp_rank: int
    first_stage: bool
    last_stage: bool

    @classmethod
    def current(cls) -> "_Replica":
        if not ps.model_parallel_is_initialized():
            return cls(1, 1, 0, True, True)
        return cls(ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
                   ps.get_data_parallel_rank(), ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage())


class MegatronGenerator:
    """:class:`~carft_nemo.generation.interface.Generator` over a (possibly DDP-wrapped) GPTModel.

    Args:
        model: this rank's stage/shard of the policy (as built by ``build_gpt_model``).
        vocab_size: the tokenizer's size; megatron's padded embedding rows are never sampled.
        max_sequence_length: prompt + response cap; default the model's own maximum.
    """

    def __init__(self, model: torch.nn.Module, vocab_size: int, max_sequence_length: int | None = None) -> None:
        self.model = model
        self.gpt = unwrap(model)
        self.vocab_size = int(vocab_size)
        self.max_sequence_length = int(max_sequence_length or self.gpt.max_sequence_length)
        config = self.gpt.config
        self._hidden_size = config.hidden_size
        self._act_dtype = config.pipeline_dtype or config.params_dtype
        self._device = device.local_device()
        cpu_compat.apply()  # no-op on GPU; megatron allocates the KV cache on current_device()

    def generate(self, prompts: list[list[int]], cfg: GenerationConfig) -> Rollout:
        """Continue each prompt; see the module docstring for batching and parallelism.

        Every rank of a model replica must call this with the same prompts and config. The
        caller's train/eval mode is restored afterwards.
        """
        self._check_prompts(prompts)
        replica = _Replica.current()
        rng = torch.Generator(device=self._device).manual_seed(cfg.seed + _DP_SEED_STRIDE * replica.dp_rank)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        size = cfg.micro_batch_size or len(prompts)
        out: dict[int, tuple[list[int], list[float], bool]] = {}
        was_training = self.model.training
        self.model.eval()
        try:
            # no_grad, not inference_mode: megatron lru-caches RoPE tables built here, and the
            # training step that follows a rollout must not meet inference tensors in them.
            with torch.no_grad():
                for lo in range(0, len(order), size):
                    chunk = order[lo : lo + size]
                    results = self._static_batch([prompts[i] for i in chunk], cfg, rng, replica)
                    out.update(zip(chunk, results))
        finally:
            self.model.train(was_training)
        return Rollout(prompts=[list(p) for p in prompts], responses=[out[i][0] for i in range(len(prompts))],
                       logprobs=[out[i][1] for i in range(len(prompts))], finished=[out[i][2] for i in range(len(prompts))])

    def _check_prompts(self, prompts: list[list[int]]) -> None:
        if not prompts:
            raise ValueError("generate: no prompts given")
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"generate: prompt {i} is empty")
            if len(p) >= self.max_sequence_length:
                raise ValueError(f"generate: prompt {i} has {len(p)} tokens; the model's max_sequence_length "
                                 f"{self.max_sequence_length} leaves no room for a response")
            bad = [t for t in p if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"generate: prompt {i} has token ids outside [0, {self.vocab_size}): {bad[:5]}")

    def _static_batch(self, prompts: list[list[int]], cfg: GenerationConfig, rng: torch.Generator,
                      replica: _Replica) -> list[tuple[list[int], list[float], bool]]:
        """One right-padded static batch: prefill to the shortest prompt, then one column per step."""
        dev = self._device
        B = len(prompts)
        lens = torch.tensor([len(p) for p in prompts], device=dev)
        budget = (self.max_sequence_length - lens).clamp(max=cfg.max_new_tokens)
        S = int((lens + budget).max())
        tokens = torch.full((B, S), cfg.pad_token_id, dtype=torch.long, device=dev)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long, device=dev)
        logprobs = torch.zeros(B, S, dtype=torch.float32, device=dev)
        positions = torch.arange(S, device=dev).unsqueeze(0).expand(B, -1)
        hidden_mask = torch.ones(S, S, dtype=torch.bool, device=dev).triu(1).view(1, 1, S, S)  # True = hidden
        eos = torch.tensor(cfg.eos_token_ids or [-1], device=dev)
        n_new = torch.zeros(B, dtype=torch.long, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        hit_eos = torch.zeros(B, dtype=torch.bool, device=dev)
        ctx = StaticInferenceContext(max_batch_size=B, max_sequence_length=S)
        start, end = 0, int(lens.min())
        while end < S:
            logits = self._stage_forward(tokens[:, start:end], positions[:, start:end],
                                         hidden_mask[..., start:end, :end], ctx, replica)
            ctx.sequence_len_offset += end - start  # megatron's static wrapper does this after each forward
            next_tok, next_lp = self._choose(logits, B, cfg, rng, replica)
            write = (lens <= end) & ~done  # prompt consumed and still generating
            tokens[write, end] = next_tok[write]
            logprobs[write, end] = next_lp[write]
            n_new += write.long()
            hit_eos |= write & torch.isin(next_tok, eos)
            done |= hit_eos | (n_new >= budget)
            if bool(done.all()):
                break
            if end + 1 >= int(lens.max()):  # every prompt is in the cache from the next step on
                ctx.enable_decode_mode()
            start, end = end, end + 1
        return [(tokens[i, len(p) : len(p) + int(n_new[i])].tolist(),
                 logprobs[i, len(p) : len(p) + int(n_new[i])].tolist(), bool(hit_eos[i]))
                for i, p in enumerate(prompts)]

    def _stage_forward(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                       ctx: StaticInferenceContext, replica: _Replica) -> torch.Tensor | None:
        """This stage's forward of one column block; last-position logits ``[b, V]`` on the last stage."""
        if not replica.first_stage:
            recv = torch.empty(tokens.shape[1], tokens.shape[0], self._hidden_size, dtype=self._act_dtype,
                               device=self._device)
            dist.recv(recv, src=ps.get_pipeline_model_parallel_prev_rank())
            self.gpt.set_input_tensor(recv)
        out = self.model(tokens, positions, mask, inference_context=ctx, runtime_gather_output=True)
        if not replica.last_stage:
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            return None
        return out[:, -1, :]

    def _choose(self, logits: torch.Tensor | None, B: int, cfg: GenerationConfig, rng: torch.Generator,
                replica: _Replica) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample on the last stage; share ``(token, log-prob)`` with the whole replica."""
        packed = torch.empty(2, B, dtype=torch.float64, device=self._device)  # ids < 2**53 are exact
        if replica.last_stage:
            tok, lp = choose_tokens(logits, greedy=cfg.greedy, temperature=cfg.temperature, top_k=cfg.top_k,
                                    top_p=cfg.top_p, vocab_size=self.vocab_size, generator=rng)
            packed[0], packed[1] = tok.double(), lp.double()
            if replica.tp_size > 1:  # one sampler decides, whatever tiny differences the TP ranks have
                dist.broadcast(packed, src=ps.get_tensor_model_parallel_src_rank(),
                               group=ps.get_tensor_model_parallel_group())
        if replica.pp_size > 1:
            dist.broadcast(packed, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        return packed[0].long(), packed[1].float()
