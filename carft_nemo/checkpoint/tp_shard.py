"""Map a rank's local megatron state dict (one TP shard of one PP stage) to and from the full one.

The full state dict is described in :mod:`carft_nemo.checkpoint.hf_conversion` (TP=1,
global layer indices, local-spec names, unpadded vocabulary). Per key:

* layer indices: megatron numbers layers per stage from 0; ``layer.layer_number`` (1-based,
  global) gives the global index, so no offset arithmetic is repeated here;
* TE-spec names: the norms are fused into the next linear layer
  (``linear_qkv.layer_norm_weight`` = ``input_layernorm.weight``,
  ``linear_fc1.layer_norm_weight`` = ``pre_mlp_layernorm.weight``);
* TP split: column-parallel weights (embedding, QKV, fc1, output layer) split dim 0,
  row-parallel ones (attention proj, fc2) split dim 1, norms are replicated. ``linear_fc1``
  holds [gate; up], each split separately (megatron's ``partition_stride=2``): with stride s
  the full tensor is cut into s*tp chunks and rank r holds chunks r, r+tp, ...;
* vocabulary: the embedding / output rows are padded to a multiple of
  ``make_vocab_size_divisible_by * tp`` with zeros on import and cut back on export;
* tied embeddings under PP: the last stage keeps its own copy of the embedding as
  ``output_layer.weight``; it is filled from (and never exported over) the embedding.

The split rules come from the names rather than from the parameters' ``partition_*``
attributes (as :mod:`carft_nemo.models.sharding` does for same-architecture state dicts)
because TE's fused linear layers do not mark the SwiGLU stride; the slicing itself is
:func:`carft_nemo.models.sharding.tp_slice`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from carft_nemo.models.config import ModelConfig
from carft_nemo.models.sharding import tp_slice

_TE_NORMS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
_VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


def split_rule(full_key: str) -> tuple[int | None, int]:
    """(partition dim or None when replicated, stride) of a full-state-dict key."""
    if full_key in _VOCAB_KEYS:
        return 0, 1
    if full_key.endswith(("linear_qkv.weight", "linear_qkv.bias")):
        return 0, 1
    if full_key.endswith("linear_fc1.weight"):
        return 0, 2
    if full_key.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return 1, 1
    return None, 1


def local_to_full_keys(model: torch.nn.Module, model_cfg: ModelConfig) -> dict[str, str]:
    """Local state-dict key -> full-state-dict key, for the keys that carry LM weights.

    Keys without a full counterpart (``_extra_state``, a critic's value head,
    the RL heads on a policy) are left out.
    """
    from carft_nemo.models.forward import unwrap
    from carft_nemo.models.heads import POLICY_HEADS, ValueHead

    gpt = unwrap(model)
    heads = POLICY_HEADS + (("output_layer.",) if isinstance(getattr(gpt, "output_layer", None), ValueHead) else ())
    layer_numbers = [layer.layer_number - 1 for layer in gpt.decoder.layers] if hasattr(gpt, "decoder") else []
    out: dict[str, str] = {}
    for key in gpt.state_dict():
        if key.endswith("_extra_state") or key.startswith(heads):
            continue
        full = key
        if key.startswith("decoder.layers."):
            _, _, local, rest = key.split(".", 3)
            full = f"decoder.layers.{layer_numbers[int(local)]}.{_TE_NORMS.get(rest, rest)}"
        if full == "output_layer.weight" and model_cfg.tie_word_embeddings:
            full = "embedding.word_embeddings.weight"  # last stage's copy of the tied embedding
        out[key] = full
    return out


def shard(full: torch.Tensor, full_key: str, tp_rank: int, tp_size: int, local_shape: torch.Size) -> torch.Tensor:
    """This rank's piece of a full tensor (zero-padding the vocab rows to the local shape * tp)."""
    dim, stride = split_rule(full_key)
    if dim is None:
        return full
    if full_key in _VOCAB_KEYS and full.shape[0] < local_shape[0] * tp_size:
        pad = full.new_zeros(local_shape[0] * tp_size - full.shape[0], *full.shape[1:])
        full = torch.cat([full, pad])
    return tp_slice(full, dim, stride, tp_rank, tp_size)


def gather(local: torch.Tensor, full_key: str, group: dist.ProcessGroup | None, tp_size: int) -> torch.Tensor:
    """Inverse of :func:`shard` over the tensor-parallel group (vocab padding kept)."""
    dim, stride = split_rule(full_key)
    if dim is None or tp_size == 1:
        return local
    pieces = [torch.empty_like(local) for _ in range(tp_size)]
    dist.all_gather(pieces, local.contiguous(), group=group)
    # with stride s, rank r holds full chunks r, r+tp, ...: put chunk j of every rank in order
    per_rank = [torch.chunk(p, stride, dim=dim) for p in pieces]
    return torch.cat([per_rank[r][j] for j in range(stride) for r in range(tp_size)], dim=dim)


def needed_full_keys(models: Iterable[torch.nn.Module], model_cfg: ModelConfig) -> list[str]:
    """The full-state-dict keys this rank's model chunks hold (what an import must read)."""
    keys: list[str] = []
    for m in models:
        keys.extend(v for v in local_to_full_keys(m, model_cfg).values() if v not in keys)
    return keys
