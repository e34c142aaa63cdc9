"""MegatronGenerator against a no-cache reference on 2 gloo processes: TP=1 (DP=2), TP=2, PP=2.

References are computed independently of the KV-cache loop: a full forward of the whole
sequence every step (greedy), and one full forward of prompt+response with megatron's
vocab-parallel log-probs for sampled rollouts.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.multiprocess import run_ranks

pytestmark = pytest.mark.distributed

VOCAB = 100  # padded to 104 (TP=1) / 112 (TP=2): the padding rows must never be sampled
PROMPTS = [[5, 17, 3], [9, 8, 7, 6, 5, 4, 3, 2, 1], [42, 43, 44, 45, 46], [1] * 12, [60, 61, 62, 63, 64, 65, 66]]
MAX_NEW = 10


def _setup(tp: int, pp: int):
    from carft_nemo.distributed.layout import ParallelConfig, initialize
    from carft_nemo.models.config import ModelConfig
    from carft_nemo.models.gpt import build_gpt_model

    # Larger init than 0.02 spreads the logits, so argmax is not decided by float noise.
    model_cfg = ModelConfig(preset="micro", vocab_size=VOCAB, init_method_std=0.1)
    parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp)
    initialize(
        parallel,
        seed=1234,
        num_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.num_query_groups,
    )
    return build_gpt_model(model_cfg, parallel)


def _full_forward(model, tokens: torch.Tensor) -> torch.Tensor | None:
    """No-cache forward of ``[b, s]`` through every stage; vocab-shard logits on the last stage."""
    from megatron.core import parallel_state as ps

    from carft_nemo.models.forward import causal_inputs

    positions, mask = causal_inputs(tokens)
    if not ps.is_pipeline_first_stage():
        hidden = torch.empty(tokens.shape[1], tokens.shape[0], model.config.hidden_size)
        dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    out = model(tokens, positions, mask)
    if not ps.is_pipeline_last_stage():
        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    return out


def _gather_vocab(shard: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    if ps.get_tensor_model_parallel_world_size() == 1:
        return shard
    parts = [torch.empty_like(shard) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, shard.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def _naive_greedy(model, prompt: list[int], max_new: int, eos: int | None) -> tuple[list[int], list[float]]:
    """Re-run the full sequence every step; argmax over the real vocabulary; share it over PP."""
    from megatron.core import parallel_state as ps

    seq, logps = list(prompt), []
    for _ in range(max_new):
        out = _full_forward(model, torch.tensor([seq]))
        pick = torch.zeros(2, dtype=torch.float64)
        if out is not None:
            last = _gather_vocab(out)[0, -1, :VOCAB].double()
            tok = int(last.argmax())
            pick[0], pick[1] = tok, float(last.log_softmax(-1)[tok].detach())
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(
                pick, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group()
            )
        seq.append(int(pick[0]))
        logps.append(float(pick[1]))
        if eos is not None and seq[-1] == eos:
            break
    return seq[len(prompt) :], logps


def _reference_sampling_logprobs(model, rollout, cfg) -> torch.Tensor | None:
    """log p of each response token under the filtered distribution, from one full forward.

    log p_K(y) = log softmax(l/T)_y - log sum_{v in K} softmax(l/T)_v, the first term from
    megatron's vocab-parallel cross entropy (``token_logprobs``), the kept set K from the
    gathered logits. Returns ``[B, S]`` aligned with ``rollout.to_batch().logprobs``.
    """
    from carft_nemo.generation.sampling import filter_logits
    from carft_nemo.models.logprobs import token_logprobs

    batch = rollout.to_batch(cfg.pad_token_id)
    shard = _full_forward(model, batch.tokens)
    if shard is None:
        return None
    logits, targets = shard[:, :-1], batch.tokens[:, 1:]
    logp_t = token_logprobs(logits, targets, cfg.temperature)
    full = _gather_vocab(logits).double()
    kept = torch.isfinite(filter_logits(full, cfg.temperature, cfg.top_k, cfg.top_p, VOCAB))
    kept_mass = (full / cfg.temperature).log_softmax(-1).exp().masked_fill(~kept, 0).sum(-1)
    out = torch.zeros_like(batch.logprobs, dtype=torch.float64)
    out[:, 1:] = logp_t.double() - kept_mass.log()
    return out


def _check_layout(rank: int, world: int, tp: int, pp: int) -> dict:
    from carft_nemo.generation import GenerationConfig, MegatronGenerator

    model = _setup(tp, pp)
    gen = MegatronGenerator(model, vocab_size=VOCAB)
    report: dict = {}

    # 1. greedy == no-cache argmax loop, token for token; log-probs agree.
    model.train()  # generation must hand the model back in the caller's mode
    greedy = gen.generate(PROMPTS, GenerationConfig(max_new_tokens=MAX_NEW, greedy=True))
    report["mode_restored"] = model.training
    model.eval()
    naive = [_naive_greedy(model, p, MAX_NEW, None) for p in PROMPTS]
    report["greedy"] = greedy.responses
    report["naive"] = [t for t, _ in naive]
    report["greedy_lp_err"] = max(abs(a - b) for (_, ref), got in zip(naive, greedy.logprobs) for a, b in zip(ref, got))

    # 2. EOS: stop at a token that greedy emits mid-way in prompt 0's continuation.
    eos = greedy.responses[0][4]
    stopped = gen.generate(PROMPTS, GenerationConfig(max_new_tokens=MAX_NEW, greedy=True, eos_token_ids=[eos]))
    report["eos"] = eos
    report["eos_responses"] = stopped.responses
    report["eos_finished"] = stopped.finished
    report["eos_naive"] = [_naive_greedy(model, p, MAX_NEW, eos)[0] for p in PROMPTS]

    # 3. micro-batches of similar length give the same greedy tokens.
    report["micro"] = gen.generate(
        PROMPTS, GenerationConfig(max_new_tokens=MAX_NEW, greedy=True, micro_batch_size=2)
    ).responses

    # 4. sampled log-probs == full forward under the same temperature / top-k / top-p.
    cfg = GenerationConfig(max_new_tokens=MAX_NEW, temperature=0.7, top_k=20, top_p=0.9, seed=7)
    sampled = gen.generate(PROMPTS, cfg)
    ref = _reference_sampling_logprobs(model, sampled, cfg)
    if ref is not None:
        batch = sampled.to_batch(cfg.pad_token_id)
        mask = batch.response_mask
        report["sample_lp_err"] = float((ref[mask] - batch.logprobs[mask].double()).abs().max())
        report["sample_lp_finite"] = bool(torch.isfinite(ref[mask]).all())
    report["sampled"] = sampled.responses
    report["sampled_again"] = gen.generate(PROMPTS, cfg).responses
    report["sampled_other_seed"] = gen.generate(
        PROMPTS, GenerationConfig(max_new_tokens=MAX_NEW, temperature=0.7, top_k=20, top_p=0.9, seed=8)
    ).responses
    report["max_id"] = max(t for r in sampled.responses + report["sampled_other_seed"] for t in r)

    # 5. a training step right after generation (PPO's pattern) must work: megatron caches
    # RoPE tables per length, so a cache filled under inference_mode would break backward.
    if pp == 1:
        model.train()
        width = max(len(p) for p in PROMPTS) + MAX_NEW  # the generation's cache length
        tokens = greedy.to_batch().tokens[:, :width]
        from carft_nemo.models.forward import causal_inputs

        model(tokens, *causal_inputs(tokens)).float().pow(2).mean().backward()
        report["grad_after_generate"] = all(p.grad is not None for p in model.parameters() if p.requires_grad)
        model.zero_grad(set_to_none=True)
        model.eval()
    return report


LAYOUTS = {"tp1_dp2": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}


def _check_all_layouts(rank: int, world: int) -> dict[str, dict]:
    """All layouts in one pair of processes: importing megatron costs more than the checks."""
    from carft_nemo.distributed.layout import shutdown

    try:
        return {name: _check_layout(rank, world, tp, pp) for name, (tp, pp) in LAYOUTS.items()}
    finally:
        shutdown()


@pytest.fixture(scope="module")
def reports() -> dict[str, list[dict]]:
    per_rank = run_ranks(_check_all_layouts, 2)
    return {name: [r[name] for r in per_rank] for name in LAYOUTS}


def _assert_layout(reports: list[dict], same_samples_on_all_ranks: bool) -> None:
    for r in reports:
        assert r["mode_restored"], "generate() left a training model in eval mode"
        assert r["greedy"] == r["naive"]
        assert all(len(t) == MAX_NEW for t in r["greedy"])
        assert r["greedy_lp_err"] < 1e-5
        assert r["micro"] == r["greedy"]
        # EOS: response = naive greedy cut right after the first EOS, flagged finished.
        assert r["eos_responses"] == r["eos_naive"]
        assert r["eos_finished"] == [r["eos"] in t for t in r["eos_naive"]]
        assert r["eos_finished"][0] and len(r["eos_responses"][0]) <= 5
        assert r["sampled"] == r["sampled_again"], "same seed must give the same samples"
        assert r["sampled"] != r["sampled_other_seed"]
        assert r["max_id"] < VOCAB
        assert r.get("grad_after_generate", True)
    checked = [r for r in reports if "sample_lp_err" in r]
    assert checked, "no rank held the last pipeline stage"
    for r in checked:
        assert r["sample_lp_finite"]
        assert r["sample_lp_err"] < 1e-5, r["sample_lp_err"]
    if same_samples_on_all_ranks:
        assert all(r["sampled"] == reports[0]["sampled"] for r in reports)


def test_generation_tp1_dp2(reports) -> None:
    _assert_layout(reports["tp1_dp2"], same_samples_on_all_ranks=False)
    # Data-parallel replicas draw from different streams for the same seed.
    assert reports["tp1_dp2"][0]["sampled"] != reports["tp1_dp2"][1]["sampled"]


def test_generation_tp2(reports) -> None:
    _assert_layout(reports["tp2"], same_samples_on_all_ranks=True)


def test_generation_pp2(reports) -> None:
    _assert_layout(reports["pp2"], same_samples_on_all_ranks=True)
