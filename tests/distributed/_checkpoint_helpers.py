"""Helpers shared by the checkpoint tests: tiny HF models and a layout-agnostic forward pass."""

from __future__ import annotations

from pathlib import Path

import torch

from carft_nemo.checkpoint.hf_io import hf_model_config
from carft_nemo.models.config import ModelConfig

SEQ, BATCH = 12, 2


def make_tiny_hf(
    out_dir: Path,
    family: str,
    *,
    tied: bool,
    vocab: int = 100,
    seed: int = 0,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    rope_theta: float = 5000.0,
) -> Path:
    """Save a randomly initialised tiny transformers Llama/Qwen2 (GQA) to ``out_dir``.

    ``heads`` / ``kv_heads`` give the query-to-key/value ratio of a larger architecture (5 for
    Qwen2.5-32B, 8 for Qwen2.5-72B and CodeLlama-34B). Every parameter (norms and biases too) is
    perturbed so that a swapped or misplaced tensor changes the logits.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    kw = dict(
        vocab_size=vocab,
        hidden_size=heads * head_dim,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=rope_theta,
        tie_word_embeddings=tied,
    )
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**kw))
    else:
        model = LlamaForCausalLM(LlamaConfig(**kw))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(str(out_dir))
    return out_dir


def hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def tiny_model_config(hf_dir: Path) -> ModelConfig:
    """The HF model's config with a vocab padding multiple that makes TP=1 and TP=2 differ."""
    return hf_model_config(hf_dir, make_vocab_size_divisible_by=8)


def megatron_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor | None:
    """Full-vocab logits ``[b, s, V_padded]`` on last-stage ranks (None elsewhere), via megatron's schedule."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from carft_nemo.models.forward import causal_inputs

    positions, mask = causal_inputs(tokens)
    store: dict[str, torch.Tensor] = {}

    def step(_it, m):
        out = m(tokens, positions, mask)

        def loss(o):
            store["logits"] = gather_from_tensor_model_parallel_region(o.detach())
            return o.sum() * 0.0, {}

        return out, loss

    model.eval()
    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=iter([None]),
            model=[model],
            num_microbatches=1,
            seq_length=tokens.shape[1],
            micro_batch_size=tokens.shape[0],
            forward_only=True,
        )
    return store["logits"] if ps.is_pipeline_last_stage() else None
