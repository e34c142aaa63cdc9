"""KV-cached batched generation on megatron-core's GPTModel, tensor- and pipeline-parallel.

Why a direct loop and not megatron's inference engines: on megatron-core 0.16.1 both engines
run on CPU only with further patches (the dynamic one replaces its flash-attention call), the
static engine allows one sampling setting per batch and treats the tokenizer's ``eod`` as both
pad and stop token, and neither returns log-probs of the tempered/filtered distribution that
PPO needs.

Why not ``GPTModel.forward(inference_context=StaticInferenceContext(...))`` either (the first
version of this loop): profiled on CPU it was several times slower than HF ``generate``,
because megatron's static cache stores keys before RoPE and re-rotates the
whole key cache every step, repeats cached K/V for GQA, runs unfused attention, and shares one
cache offset across the batch, which forced teacher-forcing longer prompts column by column.
The stage forward now lives in :mod:`carft_nemo.generation.kv_cache`: the same megatron
submodules in the same order, with a cache of rotated keys, per-row positions and SDPA.
With it, and one torch thread while generating on CPU (``GenerationConfig.cpu_threads``),
generation is on par with HF's ``generate`` on the same weights: ``python -m
benchmarks.generation`` measures both, results in ``benchmarks/results/generation.json``
(at small_100m each decode step streams the fp32 weights and most of the time is in
``F.linear``: both sides are memory-bound).

Batching prompts of different lengths: prompts are right-padded; one causal prefill fills the
cache for every prompt; the logits at each row's own last prompt token give its first new
token; from then on each step feeds one token per row at that row's own position, and
attention masks cache positions beyond it. Prompts are still sorted by length and split into
``micro_batch_size`` groups so a group's padding and cache stay small.

Parallelism: each step the first pipeline stage embeds the new column, stages pass hidden
states ``[s, b, h]`` with point-to-point send/recv, and the last stage gathers only the last
position's logits over tensor parallel (``[b, V]``, inside megatron's output layer), samples,
then broadcasts ``(token, log-prob)`` to its tensor-parallel group and to every pipeline
stage, so all ranks of a replica hold the same tokens. Data-parallel replicas, and the
context-parallel ranks of each (full weights, whole sequences in the cache), generate their own
prompts; each samples from ``derive_seed(cfg.seed, "replica_sampling", r)`` with ``r`` its rank
along data x context parallel (the same as the data-parallel rank without CP).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from carft_nemo.distributed import axes, cpu_compat, device
from carft_nemo.generation.config import GenerationConfig
from carft_nemo.generation.kv_cache import KVCacheStage, check_supported
from carft_nemo.generation.rollout import Rollout
from carft_nemo.generation.sampling import choose_tokens
from carft_nemo.models.forward import unwrap
from carft_nemo.seeding import derive_seed


@dataclass(frozen=True)
class _Replica:
    """Where this rank sits in its model replica (read once from megatron's parallel state)."""

    tp_size: int
    pp_size: int
    index: int  # generation's replica: data x context parallel (ParallelLayout.generation_replica)
    first_stage: bool
    last_stage: bool

    @classmethod
    def current(cls) -> _Replica:
        return cls(axes.size("tp"), axes.size("pp"), axes.rank("dp_cp"), axes.is_first_stage(), axes.is_last_stage())


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
        cpu_compat.apply()  # no-op on GPU; megatron builds RoPE tables on current_device()
        check_supported(self.gpt)

    def generate(self, prompts: list[list[int]], cfg: GenerationConfig) -> Rollout:
        """Continue each prompt; see the module docstring for batching and parallelism.

        Every rank of a model replica must call this with the same prompts and config. The
        caller's train/eval mode and torch's CPU thread count are restored afterwards.
        """
        self._check_prompts(prompts)
        replica = self._replica = _Replica.current()
        rng = torch.Generator(device=self._device).manual_seed(derive_seed(cfg.seed, "replica_sampling", replica.index))
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        size = cfg.micro_batch_size or len(prompts)
        out: dict[int, tuple[list[int], list[float], bool]] = {}
        was_training = self.model.training
        threads = torch.get_num_threads()
        if cfg.cpu_threads and self._device.type == "cpu":
            torch.set_num_threads(cfg.cpu_threads)  # why: see GenerationConfig.cpu_threads
        self.model.eval()
        try:
            # no_grad, not inference_mode: megatron lru-caches RoPE tables built here, and the
            # training step that follows a rollout must not meet inference tensors in them.
            with torch.no_grad():
                for lo in range(0, len(order), size):
                    chunk = order[lo : lo + size]
                    results = self._generate_batch([prompts[i] for i in chunk], cfg, rng, replica)
                    out.update(zip(chunk, results))
        finally:
            self.model.train(was_training)
            torch.set_num_threads(threads)
        return Rollout(
            prompts=[list(p) for p in prompts],
            responses=[out[i][0] for i in range(len(prompts))],
            logprobs=[out[i][1] for i in range(len(prompts))],
            finished=[out[i][2] for i in range(len(prompts))],
        )

    def _check_prompts(self, prompts: list[list[int]]) -> None:
        if not prompts:
            raise ValueError("generate: no prompts given")
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"generate: prompt {i} is empty")
            if len(p) >= self.max_sequence_length:
                raise ValueError(
                    f"generate: prompt {i} has {len(p)} tokens; the model's max_sequence_length "
                    f"{self.max_sequence_length} leaves no room for a response"
                )
            bad = [t for t in p if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"generate: prompt {i} has token ids outside [0, {self.vocab_size}): {bad[:5]}")

    def _generate_batch(
        self, prompts: list[list[int]], cfg: GenerationConfig, rng: torch.Generator, replica: _Replica
    ) -> list[tuple[list[int], list[float], bool]]:
        """One right-padded batch: one causal prefill of every prompt, then one token per row per step."""
        dev = self._device
        B = len(prompts)
        lens = torch.tensor([len(p) for p in prompts], device=dev)
        budget = (self.max_sequence_length - lens).clamp(max=cfg.max_new_tokens)
        width, steps = int(lens.max()), int(budget.max())
        S = int((lens + budget).max())  # the last chosen token is never fed back: S - 1 cached positions suffice
        prompt = torch.full((B, width), cfg.pad_token_id, dtype=torch.long, device=dev)
        for i, p in enumerate(prompts):
            prompt[i, : len(p)] = torch.tensor(p, dtype=torch.long, device=dev)
        new_tok = torch.full((B, steps), cfg.pad_token_id, dtype=torch.long, device=dev)
        new_lp = torch.zeros(B, steps, dtype=torch.float32, device=dev)
        eos = torch.tensor(cfg.eos_token_ids or [-1], device=dev)
        n_new = torch.zeros(B, dtype=torch.long, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        hit_eos = torch.zeros(B, dtype=torch.bool, device=dev)
        stage = KVCacheStage(self.gpt, B, S)
        logits = self._stage_call(stage.prefill, prompt, (width, B), lens - 1)
        positions = lens.clone()  # where each row's next input token sits
        for step in range(steps):
            tok, lp = self._choose(logits, B, cfg, rng, replica)
            live = ~done
            new_tok[:, step] = torch.where(live, tok, new_tok[:, step])
            new_lp[:, step] = torch.where(live, lp, new_lp[:, step])
            n_new += live.long()
            hit_eos |= live & torch.isin(tok, eos)
            done |= hit_eos | (n_new >= budget)
            if step + 1 == steps or bool(done.all()):
                break
            # finished rows keep decoding (cheaper than compacting the batch); their outputs are
            # dropped and their positions clamped so they stay inside the cache
            kv_len = min(width + step + 1, S)
            logits = self._stage_call(stage.decode, tok[:, None], (1, B), positions, kv_len)
            positions = (positions + 1).clamp_(max=S - 1)
        counts = n_new.tolist()
        toks, lps, eos_hit = new_tok.tolist(), new_lp.tolist(), hit_eos.tolist()
        return [(toks[i][: counts[i]], lps[i][: counts[i]], bool(eos_hit[i])) for i in range(B)]

    def _stage_call(self, fn, tokens: torch.Tensor, seq_batch: tuple[int, int], *args) -> torch.Tensor | None:
        """Run this stage's ``fn`` (prefill/decode); hidden states ``[s, b, h]`` travel between stages."""
        replica = self._replica
        x = tokens
        if not replica.first_stage:
            x = torch.empty(*seq_batch, self._hidden_size, dtype=self._act_dtype, device=self._device)
            dist.recv(x, src=axes.previous_stage_rank())
        out = fn(x, *args)
        if not replica.last_stage:
            dist.send(out.contiguous(), dst=axes.next_stage_rank())
            return None
        return out

    def _choose(
        self, logits: torch.Tensor | None, B: int, cfg: GenerationConfig, rng: torch.Generator, replica: _Replica
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample on the last stage; share ``(token, log-prob)`` with the whole replica."""
        packed = torch.empty(2, B, dtype=torch.float64, device=self._device)  # ids < 2**53 are exact
        if replica.last_stage:
            tok, lp = choose_tokens(
                logits,
                greedy=cfg.greedy,
                temperature=cfg.temperature,
                top_k=cfg.top_k,
                top_p=cfg.top_p,
                vocab_size=self.vocab_size,
                generator=rng,
            )
            packed[0], packed[1] = tok.double(), lp.double()
            if replica.tp_size > 1:  # one sampler decides, whatever tiny differences the TP ranks have
                dist.broadcast(packed, src=axes.tensor_parallel_source_rank(), group=axes.group("tp"))
        if replica.pp_size > 1:
            dist.broadcast(packed, src=axes.last_stage_rank(), group=axes.group("pp"))
        return packed[0].long(), packed[1].float()
