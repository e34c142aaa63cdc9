"""Pure name/tensor mapping between HF Llama/Qwen2 state dicts and megatron's full layout.

The "full megatron state dict" here is the TP=1, PP=1 view in megatron-core's local-spec
names with *global* layer indices and the *unpadded* vocabulary:

    embedding.word_embeddings.weight                      [V, h]
    decoder.layers.{i}.input_layernorm.weight             [h]
    decoder.layers.{i}.self_attention.linear_qkv.weight   [(nh + 2 ng) d, h]
    decoder.layers.{i}.self_attention.linear_qkv.bias     [(nh + 2 ng) d]      (qwen2)
    decoder.layers.{i}.self_attention.linear_proj.weight  [h, nh d]
    decoder.layers.{i}.pre_mlp_layernorm.weight           [h]
    decoder.layers.{i}.mlp.linear_fc1.weight              [2 f, h]  = [gate; up]
    decoder.layers.{i}.mlp.linear_fc2.weight              [h, f]
    decoder.final_layernorm.weight                        [h]
    output_layer.weight                                   [V, h]   (absent when tied)

Megatron fuses Q, K and V *per query group*: for group g (of ng, each serving nh/ng query
heads of size d) the rows are [q heads of g; k_g; v_g], so that a tensor-parallel split of
dim 0 into equal parts keeps whole groups together. HF keeps q_proj, k_proj, v_proj
separate. Sharding to a TP/PP layout and vocab padding happen elsewhere
(:mod:`carft_nemo.checkpoint.tp_shard`); this module never touches torch.distributed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

from carft_nemo.checkpoint.hf_config import HFConversionError
from carft_nemo.models.config import ModelConfig

StateDict = dict[str, torch.Tensor]


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Interleave HF q/k/v (weights ``[*, h]`` or biases ``[*]``) into megatron's per-group layout."""
    ng, d = cfg.num_query_groups, cfg.head_dim
    per_group = cfg.num_attention_heads // ng
    tail = q.shape[1:]
    fused = torch.cat([q.reshape(ng, per_group * d, *tail), k.reshape(ng, d, *tail), v.reshape(ng, d, *tail)], dim=1)
    return fused.reshape(-1, *tail)


def split_qkv(fused: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv`: megatron's fused rows back to HF q, k, v."""
    ng, d = cfg.num_query_groups, cfg.head_dim
    per_group = cfg.num_attention_heads // ng
    tail = fused.shape[1:]
    grouped = fused.reshape(ng, (per_group + 2) * d, *tail)
    q, k, v = torch.split(grouped, [per_group * d, d, d], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


def _take(sd: Mapping[str, torch.Tensor], key: str, shape: tuple[int, ...], where: str) -> torch.Tensor:
    if key not in sd:
        raise HFConversionError(f"{where}: tensor {key!r} is missing")
    t = sd[key]
    if tuple(t.shape) != shape:
        raise HFConversionError(
            f"{where}: tensor {key!r} has shape {tuple(t.shape)}, expected {shape} from the model config"
        )
    return t


def _recipes(cfg: ModelConfig, where: str) -> dict[str, Callable[[Mapping[str, torch.Tensor]], torch.Tensor]]:
    """For each full-megatron key, how to build it from the HF tensors (read lazily)."""
    h, f, V = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size
    q_rows, kv_rows = cfg.num_attention_heads * cfg.head_dim, cfg.num_query_groups * cfg.head_dim

    def plain(key: str, shape: tuple[int, ...]):
        return lambda hf: _take(hf, key, shape, where)

    def qkv(prefix: str, suffix: str, tail: tuple[int, ...]):
        return lambda hf: fuse_qkv(
            _take(hf, f"{prefix}q_proj.{suffix}", (q_rows, *tail), where),
            _take(hf, f"{prefix}k_proj.{suffix}", (kv_rows, *tail), where),
            _take(hf, f"{prefix}v_proj.{suffix}", (kv_rows, *tail), where),
            cfg,
        )

    def gate_up(prefix: str):
        return lambda hf: torch.cat(
            [_take(hf, prefix + "gate_proj.weight", (f, h), where), _take(hf, prefix + "up_proj.weight", (f, h), where)]
        )

    out = {"embedding.word_embeddings.weight": plain("model.embed_tokens.weight", (V, h))}
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        out[dst + "input_layernorm.weight"] = plain(src + "input_layernorm.weight", (h,))
        out[dst + "self_attention.linear_qkv.weight"] = qkv(src + "self_attn.", "weight", (h,))
        if cfg.qkv_bias:
            out[dst + "self_attention.linear_qkv.bias"] = qkv(src + "self_attn.", "bias", ())
        out[dst + "self_attention.linear_proj.weight"] = plain(src + "self_attn.o_proj.weight", (h, q_rows))
        out[dst + "pre_mlp_layernorm.weight"] = plain(src + "post_attention_layernorm.weight", (h,))
        out[dst + "mlp.linear_fc1.weight"] = gate_up(src + "mlp.")
        out[dst + "mlp.linear_fc2.weight"] = plain(src + "mlp.down_proj.weight", (h, f))
    out["decoder.final_layernorm.weight"] = plain("model.norm.weight", (h,))
    if not cfg.tie_word_embeddings:
        out["output_layer.weight"] = plain("lm_head.weight", (V, h))
    return out


def hf_to_megatron(
    hf: Mapping[str, torch.Tensor], cfg: ModelConfig, *, keys: Iterable[str] | None = None, where: str = "HF state dict"
) -> StateDict:
    """Full megatron state dict (see module doc) from an HF Llama/Qwen2 state dict.

    ``keys`` restricts the output to those megatron keys, so a pipeline stage reads only its
    own tensors from a lazily loaded ``hf`` mapping. Shapes are checked against ``cfg``, so
    a checkpoint of another size fails naming the tensor.
    """
    layer_ids = {int(k.split(".")[2]) for k in hf if k.startswith("model.layers.")}
    extra = sorted(i for i in layer_ids if i >= cfg.num_layers)
    if extra:
        raise HFConversionError(f"{where}: has {max(layer_ids) + 1} layers but model.num_layers={cfg.num_layers}")
    recipes = _recipes(cfg, where)
    wanted = list(recipes) if keys is None else list(keys)
    unknown = [k for k in wanted if k not in recipes]
    if unknown:
        raise HFConversionError(f"no HF source for megatron tensor(s) {unknown[:3]} (model config: {cfg.family})")
    return {k: recipes[k](hf) for k in wanted}


def megatron_to_hf(full: Mapping[str, torch.Tensor], cfg: ModelConfig, *, partial: bool = False) -> StateDict:
    """HF state dict from a full megatron state dict; vocab padding rows are dropped.

    With tied embeddings no ``lm_head.weight`` is written (transformers ties it on load).
    ``partial``: ``full`` holds only some pieces (the embedding, whole layers, the final norm,
    the output layer) and only those are converted: the streamed export writes a layer at a time.
    """
    V = cfg.vocab_size
    out: StateDict = {}
    if not partial or "embedding.word_embeddings.weight" in full:
        out["model.embed_tokens.weight"] = full["embedding.word_embeddings.weight"][:V]
    layers = range(cfg.num_layers)
    if partial:
        layers = sorted({int(k.split(".")[2]) for k in full if k.startswith("decoder.layers.")})
    for i in layers:
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = full[src + "input_layernorm.weight"]
        q, k, v = split_qkv(full[src + "self_attention.linear_qkv.weight"], cfg)
        out.update(
            {dst + "self_attn.q_proj.weight": q, dst + "self_attn.k_proj.weight": k, dst + "self_attn.v_proj.weight": v}
        )
        if cfg.qkv_bias:
            qb, kb, vb = split_qkv(full[src + "self_attention.linear_qkv.bias"], cfg)
            out.update(
                {
                    dst + "self_attn.q_proj.bias": qb,
                    dst + "self_attn.k_proj.bias": kb,
                    dst + "self_attn.v_proj.bias": vb,
                }
            )
        out[dst + "self_attn.o_proj.weight"] = full[src + "self_attention.linear_proj.weight"]
        out[dst + "post_attention_layernorm.weight"] = full[src + "pre_mlp_layernorm.weight"]
        gate, up = torch.chunk(full[src + "mlp.linear_fc1.weight"], 2, dim=0)
        out[dst + "mlp.gate_proj.weight"], out[dst + "mlp.up_proj.weight"] = gate, up
        out[dst + "mlp.down_proj.weight"] = full[src + "mlp.linear_fc2.weight"]
    if not partial or "decoder.final_layernorm.weight" in full:
        out["model.norm.weight"] = full["decoder.final_layernorm.weight"]
    if not cfg.tie_word_embeddings and (not partial or "output_layer.weight" in full):
        out["lm_head.weight"] = full["output_layer.weight"][:V]
    return {k: v.contiguous() for k, v in out.items()}
