"""Cut a full (TP=1, PP=1) state dict into this rank's tensor- and pipeline-parallel shard.

Megatron marks every tensor-parallel parameter with ``partition_dim`` (0 for
column-parallel and vocab-parallel weights, 1 for row-parallel) and ``partition_stride``.
The stride matters for SwiGLU's ``linear_fc1``: its full weight is ``[gate; up]`` and each
rank holds ``[gate_r; up_r]``, so the full dimension is split into ``tp * stride`` equal
pieces and rank ``r`` takes pieces ``r, r + tp, r + 2 tp, ...`` (the same rule as megatron's
``_initialize_affine_weight_cpu``). A plain ``chunk(tp)`` would give rank 0 both halves of
the gate and wrong logits. GQA ``linear_qkv`` is stored group-major (each query group's
``[q..., k, v]`` rows together), so a stride-1 split hands each rank whole groups.

Pipeline stages number their layers locally (``decoder.layers.0`` on every stage); the
global index is ``layer_number - 1`` of the built layer. The last stage of a model with tied
embeddings owns a copy of the word embedding as ``output_layer.weight``.

Used by the parallel-equivalence tests (same initial weights under every layout) and by
anything that loads a full, unsharded checkpoint (HF import) into a parallel model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from carft_nemo.distributed import axes

_LAYER_KEY = re.compile(r"^(decoder\.layers\.)(\d+)(\..*)$")
_TIED_OUTPUT = "output_layer.weight"
_WORD_EMBEDDING = "embedding.word_embeddings.weight"


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):
        model = model.module
    return model


def _global_key(local_key: str, layer_offsets: list[int]) -> str:
    match = _LAYER_KEY.match(local_key)
    if match is None:
        return local_key
    return f"{match.group(1)}{layer_offsets[int(match.group(2))]}{match.group(3)}"


def tp_slice(full: torch.Tensor, dim: int, stride: int, tp_rank: int, tp_size: int) -> torch.Tensor:
    """Rank ``tp_rank``'s piece of ``full`` along ``dim`` for a strided TP partition.

    ``full.size(dim)`` is split into ``tp_size * stride`` equal pieces; the rank keeps
    pieces ``tp_rank::tp_size`` and concatenates them in order.
    """
    pieces = tp_size * stride
    if full.size(dim) % pieces:
        raise ValueError(
            f"dimension {dim} of size {full.size(dim)} does not split into "
            f"tensor_parallel*partition_stride = {tp_size}*{stride} pieces"
        )
    chunks = torch.split(full, full.size(dim) // pieces, dim=dim)
    return torch.cat(chunks[tp_rank::tp_size], dim=dim)


def shard_state_dict_for_tp(
    full_sd: Mapping[str, torch.Tensor],
    model: torch.nn.Module,
    *,
    tp_rank: int | None = None,
    tp_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """The state dict ``model`` (this rank's TP/PP shard) should load, cut from ``full_sd``.

    ``full_sd`` is the state dict of the same architecture built at TP=1, PP=1 (keys of the
    bare GPTModel, no DDP ``module.`` prefix). ``tp_rank``/``tp_size`` default to the "tp" axis
    of :mod:`carft_nemo.distributed.axes`. Entries the model keeps for itself (``_extra_state``) keep the model's
    own value. Raises ``KeyError``/``ValueError`` naming the key when shapes do not fit
    (e.g. a vocabulary padded to a different multiple).
    """
    if tp_rank is None or tp_size is None:
        tp_rank, tp_size = axes.rank("tp"), axes.size("tp")
    gpt = _unwrap(model)
    layers = getattr(getattr(gpt, "decoder", None), "layers", [])
    layer_offsets = [int(layer.layer_number) - 1 for layer in layers]
    params = dict(gpt.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for key, own in gpt.state_dict().items():
        if key.endswith("_extra_state") or not isinstance(own, torch.Tensor):
            out[key] = own
            continue
        source = _global_key(key, layer_offsets)
        if source not in full_sd and source == _TIED_OUTPUT:
            source = _WORD_EMBEDDING  # last PP stage's copy of a tied embedding
        if source not in full_sd:
            raise KeyError(f"full state dict has no entry {source!r} (needed for {key!r})")
        full = full_sd[source]
        param = params.get(key)
        if param is not None and getattr(param, "tensor_model_parallel", False) and tp_size > 1:
            full = tp_slice(full, param.partition_dim, getattr(param, "partition_stride", 1), tp_rank, tp_size)
        if tuple(full.shape) != tuple(own.shape):
            raise ValueError(
                f"{key!r}: full state dict gives shape {tuple(full.shape)} for this shard, "
                f"the model has {tuple(own.shape)} (different padded vocab or architecture?)"
            )
        out[key] = full.to(dtype=own.dtype, device=own.device)
    return out


def load_full_state_dict(model: torch.nn.Module, full_sd: Mapping[str, torch.Tensor]) -> None:
    """Load a full (TP=1, PP=1) state dict into this rank's shard of ``model`` (strict)."""
    _unwrap(model).load_state_dict(shard_state_dict_for_tp(full_sd, model), strict=True)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of a TP=1, PP=1 model's state dict, keyed as :func:`shard_state_dict_for_tp` expects."""
    return {
        k: v.detach().to("cpu", copy=True)
        for k, v in _unwrap(model).state_dict().items()
        if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")
    }


__all__ = ["full_state_dict", "load_full_state_dict", "shard_state_dict_for_tp", "tp_slice"]
