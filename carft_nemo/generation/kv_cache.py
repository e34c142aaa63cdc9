"""A KV-cached forward of one pipeline stage of megatron's GPTModel, for generation.

Why not ``GPTModel.forward(inference_context=StaticInferenceContext(...))``: on megatron-core
0.16.1 with the local (non-TE) spec that path stores keys *before* RoPE and re-rotates the
whole key cache every step, repeats cached K/V for GQA, runs the unfused local attention, and
applies RoPE by one cache offset shared by the batch, so prompts of different lengths had to
be teacher-forced one column per step. Profiled on CPU that made generation several times
slower than HF ``generate`` (``benchmarks/results/generation.json`` has today's comparison).

This module runs the *same submodules* of each ``TransformerLayer`` in the same order
(``input_layernorm`` -> ``self_attention.get_query_key_value_tensors`` -> RoPE ->
attention -> ``linear_proj`` -> residual -> ``pre_mlp_layernorm`` -> ``mlp`` -> residual),
so tensor parallelism (column/row-parallel linears and their all-reduces), TE fused
norm+linear modules and q/k layernorms behave as in megatron's own forward. Only the
attention core differs:

- the cache holds keys *after* RoPE, so each step rotates only the new token's q/k;
- every row has its own position (``[b]``), so a right-padded batch of prompts is prefilled
  in one causal pass and each row decodes from its own prompt length;
- attention is ``torch.nn.functional.scaled_dot_product_attention`` with ``enable_gqa``
  (no repeated K/V) and a per-row length mask ``key position <= row position``.

Supported: dense GPT layers with RoPE (Llama/Qwen2 family, as built by
:func:`carft_nemo.models.gpt.build_gpt_model`); anything else raises ``NotImplementedError``
at construction rather than generating wrong tokens.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP


def check_supported(gpt: torch.nn.Module) -> None:
    """Raise ``NotImplementedError`` for GPT features this cached forward does not reproduce."""
    c = gpt.config
    unsupported = {
        "position_embedding_type != 'rope'": getattr(gpt, "position_embedding_type", "rope") != "rope",
        "num_moe_experts": bool(getattr(c, "num_moe_experts", None)),
        "multi_latent_attention": bool(getattr(c, "multi_latent_attention", False)),
        "mtp_num_layers": bool(getattr(c, "mtp_num_layers", None)),
        "attention_output_gate": bool(getattr(c, "attention_output_gate", False)),
        "apply_residual_connection_post_layernorm": bool(c.apply_residual_connection_post_layernorm),
        "no_rope_freq": bool(getattr(c, "no_rope_freq", None)),
        "sequence_parallel": bool(c.sequence_parallel),
    }
    rope = getattr(gpt, "rotary_pos_emb", None)
    # YaRN / multimodal RoPE need mscale or 3-D positions that this forward does not pass
    unsupported["RoPE variant " + type(rope).__name__] = rope is not None and type(rope) is not RotaryEmbedding
    bad = [name for name, flag in unsupported.items() if flag]
    if bad:
        raise NotImplementedError(f"cached generation does not support: {', '.join(bad)}")


class KVCacheStage:
    """This rank's stage of the model with a K/V cache of ``batch`` rows and ``capacity`` positions.

    Cache layout per layer: keys/values ``[b, g, S, d]`` (``g`` = this rank's query groups,
    ``S`` = capacity, ``d`` = head dim); keys are stored after RoPE.
    """

    def __init__(self, gpt: torch.nn.Module, batch: int, capacity: int) -> None:
        self.gpt = gpt
        config = gpt.config
        self.layers = list(gpt.decoder.layers)
        first = self.layers[0].self_attention if self.layers else None
        groups = first.num_query_groups_per_partition if first is not None else 0
        head_dim = config.kv_channels
        self.scale = config.softmax_scale or 1.0 / math.sqrt(head_dim)
        dtype = self.dtype = config.params_dtype
        dev = next(gpt.parameters()).device
        shape = (batch, groups, capacity, head_dim)
        # zeros, not empty: a masked-out value still enters attention as 0 * v, and 0 * NaN = NaN
        self.keys = [torch.zeros(shape, dtype=dtype, device=dev) for _ in self.layers]
        self.values = [torch.zeros(shape, dtype=dtype, device=dev) for _ in self.layers]
        # [S, 1, dim] RoPE angles, built once (megatron lru-caches the same table)
        # the whole table: under context parallelism the module's forward returns only this rank's
        # chunks, and generation runs the full sequence on every context-parallel rank
        self.freqs = gpt.rotary_pos_emb.get_emb(gpt.max_sequence_length)[:, 0]
        # cos/sin once per step instead of per layer and tensor: Llama-style RoPE on the full head
        self.plain_rope = (
            not config.rotary_interleaved and self.freqs.shape[-1] == head_dim and not config.apply_rope_fusion
        )
        self.batch_index = torch.arange(batch, device=dev)
        self.tp = config.tensor_model_parallel_size

    def prefill(self, hidden_or_tokens: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Causal pass over right-padded prompts ``[b, s]`` (or hidden ``[s, b, h]`` from the previous stage).

        Rows attend only to earlier columns, so padding after a row's prompt never reaches its
        real tokens; the cache entries written for padding are overwritten by decode steps
        before any query can see them. Returns this stage's output: hidden ``[s, b, h]``, or on
        the last stage the logits ``[b, V]`` at column ``last`` (``[b]``) of each row.
        """
        s = hidden_or_tokens.shape[1] if self.gpt.pre_process else hidden_or_tokens.shape[0]
        positions = torch.arange(s, device=self.batch_index.device)
        freqs = self._angles(self.freqs[:s].unsqueeze(1))  # [s, 1, 1, dim]: same positions for every row
        x = self._embed(hidden_or_tokens, positions.unsqueeze(0).expand(len(self.batch_index), -1))
        for i, layer in enumerate(self.layers):
            x = self._layer(i, layer, x, freqs, cache_at=None, mask=None)
        return self._head(x, last)

    def decode(self, hidden_or_tokens: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """One new token per row at ``positions`` (``[b]``); keys ``<= position`` are visible.

        ``kv_len`` bounds the attended cache (any value ``> positions.max()``), so the cost
        grows with the longest live row, not with the capacity.
        """
        freqs = self._angles(self.freqs[positions].unsqueeze(0))  # [1, b, 1, dim]
        mask = (torch.arange(kv_len, device=positions.device) <= positions[:, None]).view(-1, 1, 1, kv_len)
        x = self._embed(hidden_or_tokens, positions[:, None])
        for i, layer in enumerate(self.layers):
            x = self._layer(i, layer, x, freqs, cache_at=(positions, kv_len), mask=mask)
        return self._head(x, None)

    def _angles(self, freqs: torch.Tensor):
        """Per-step RoPE input for :meth:`_rope`: ``(cos, sin)`` on the plain path, else the angles."""
        if not self.plain_rope:
            return freqs
        # rotate_half(t) * sin == roll(t, d/2) * [-sin_1, sin_2]: one roll instead of chunk/neg/cat
        half = freqs.shape[-1] // 2
        sin = freqs.sin()
        signed_sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        return freqs.cos().to(self.dtype), signed_sin.to(self.dtype)

    def _rope(self, t: torch.Tensor, angles) -> torch.Tensor:
        """Rotate ``t`` ``[s, b, heads, d]``; megatron's own function unless the plain (Llama) case."""
        if not self.plain_rope:
            return apply_rotary_pos_emb(t, angles, config=self.gpt.config)
        cos, signed_sin = angles
        return t * cos + t.roll(t.shape[-1] // 2, dims=-1) * signed_sin

    def _embed(self, hidden_or_tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if not self.gpt.pre_process:
            return hidden_or_tokens
        return self.gpt.embedding(input_ids=hidden_or_tokens, position_ids=positions)  # [s, b, h]

    def _head(self, x: torch.Tensor, last: torch.Tensor | None) -> torch.Tensor:
        if not self.gpt.post_process:
            return x
        x = x[-1] if last is None else x[last, self.batch_index]  # [b, h]
        norm = self.gpt.decoder.final_layernorm
        if norm is not None:
            x = norm(x)
        weight = self.gpt.shared_embedding_or_output_weight() if self.gpt.share_embeddings_and_output_weights else None
        head = self.gpt.output_layer
        if type(head) is ColumnParallelLinear and self.tp == 1 and head.bias is None:
            # skips the autograd Function and the gather check of megatron's forward (TP=1)
            return F.linear(x, head.weight if weight is None else weight)  # [b, V] (padded vocab)
        logits, _ = head(x.unsqueeze(0), weight=weight, runtime_gather_output=True)
        return logits[0]  # [b, V] (padded vocab), gathered over TP

    def _layer(
        self,
        i: int,
        layer: torch.nn.Module,
        x: torch.Tensor,
        freqs: torch.Tensor,
        cache_at: tuple[torch.Tensor, int] | None,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """One TransformerLayer on ``x`` ``[s, b, h]`` (pre-norm residual blocks, as megatron's)."""
        attn = layer.self_attention
        q, k, v = _qkv(attn, layer.input_layernorm(x))  # [s, b, heads, d]
        q, k = self._rope(q, freqs), self._rope(k, freqs)
        keys, values = self.keys[i], self.values[i]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s, d]
        if cache_at is None:  # prefill from position 0
            s = q.shape[2]
            keys[:, :, :s] = k
            values[:, :, :s] = v
            ctx = F.scaled_dot_product_attention(
                q, keys[:, :, :s], values[:, :, :s], is_causal=True, scale=self.scale, enable_gqa=True
            )
        else:
            positions, kv_len = cache_at
            keys[self.batch_index, :, positions] = k[:, :, 0]
            values[self.batch_index, :, positions] = v[:, :, 0]
            ctx = F.scaled_dot_product_attention(
                q, keys[:, :, :kv_len], values[:, :, :kv_len], attn_mask=mask, scale=self.scale, enable_gqa=True
            )
        b, heads, s, d = ctx.shape
        out, bias = _row(attn.linear_proj, ctx.permute(2, 0, 1, 3).reshape(s, b, heads * d))
        x = x + out if bias is None else x + out + bias
        out, bias = _mlp(layer.mlp, layer.pre_mlp_layernorm(x))
        return x + out if bias is None else x + out + bias


# Fast paths for megatron's *local* (non-TE) modules. In inference they compute exactly these
# ops, but each call goes through an autograd Function, async-allreduce warnings and process
# group look-ups, which per decode step cost about as much as the tiny model's matmuls on CPU.
# Only exact types take the fast path; subclasses and TE modules run their own forward.


def _column(m: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ColumnParallelLinear forward without sequence parallel or gather: this rank's output shard."""
    if type(m) is not ColumnParallelLinear or m.gather_output:
        return m(x)
    return F.linear(x, m.weight, None if m.skip_bias_add else m.bias), (m.bias if m.skip_bias_add else None)


def _row(m: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RowParallelLinear forward on a parallel input: partial product, all-reduce over TP, bias."""
    if type(m) is not RowParallelLinear or not m.input_is_parallel:
        return m(x)
    y = F.linear(x, m.weight)
    if m.tp_group is not None and m.tp_group.size() > 1:
        dist.all_reduce(y, group=m.tp_group)
    if m.skip_bias_add or m.bias is None:
        return y, m.bias if m.skip_bias_add else None
    return y + m.bias, None


def _mlp(mlp: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """megatron's MLP (fc1 -> [gated] activation -> fc2) with the fast linears."""
    if type(mlp) is not MLP or mlp.config.add_bias_linear:
        return mlp(x)
    h, _ = _column(mlp.linear_fc1, x)
    if mlp.config.gated_linear_unit:
        gate, up = torch.chunk(h, 2, dim=-1)
        h = mlp.config.activation_func(gate) * up
    else:
        h = mlp.config.activation_func(h)
    return _row(mlp.linear_fc2, h)


def _qkv(attn: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``get_query_key_value_tensors`` when every TP rank holds whole query groups: ``[s, b, heads, d]``."""
    if type(attn.linear_qkv) is not ColumnParallelLinear or attn.config.num_query_groups < attn.world_size:
        return attn.get_query_key_value_tensors(x, None)
    mixed, _ = _column(attn.linear_qkv, x)
    d = attn.hidden_size_per_attention_head
    groups = attn.num_query_groups_per_partition
    per_group = attn.num_attention_heads_per_partition // groups
    mixed = mixed.view(*mixed.shape[:-1], groups, (per_group + 2) * d)
    q, k, v = torch.split(mixed, [per_group * d, d, d], dim=3)
    q = q.reshape(q.shape[0], q.shape[1], -1, d)
    if attn.q_layernorm is not None:
        q = attn.q_layernorm(q)
    if attn.k_layernorm is not None:
        k = attn.k_layernorm(k)
    return q, k, v
