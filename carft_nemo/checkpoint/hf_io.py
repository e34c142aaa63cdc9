"""Import an HF Llama/Qwen2 folder into megatron models of any TP/PP layout, and export back.

Import: every rank reads only the tensors its stage needs (safetensors are opened lazily),
converts them to the full megatron layout and keeps its tensor-parallel slice.
Export (streamed): each pipeline stage writes its own tensors a piece (at most a layer) at a
time as safetensors files, and global rank 0 writes the index, ``config.json`` and the tokenizer,
a folder that ``transformers.AutoModelForCausalLM.from_pretrained`` loads.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from carft_nemo.checkpoint.hf_config import (
    HFConversionError,
    check_compatible,
    hf_config_dict,
    model_config_from_hf,
    read_hf_config,
)
from carft_nemo.checkpoint.hf_conversion import hf_to_megatron, megatron_to_hf
from carft_nemo.checkpoint.tp_shard import gather, local_to_full_keys, needed_full_keys, shard
from carft_nemo.distributed import axes
from carft_nemo.models.config import ModelConfig
from carft_nemo.models.forward import unwrap

Models = torch.nn.Module | Sequence[torch.nn.Module]


class LazySafetensors(Mapping[str, torch.Tensor]):
    """Read-on-access view of the tensors of every ``*.safetensors`` file in an HF folder."""

    def __init__(self, hf_dir: str | Path) -> None:
        from safetensors import safe_open

        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
        if not files:
            found = sorted(p.name for p in self.dir.iterdir()) if self.dir.is_dir() else []
            raise HFConversionError(
                f"{self.dir}: no *.safetensors weights found (files: {found[:8]}); "
                "convert .bin checkpoints with transformers' save_pretrained first"
            )
        self._handles = {f: safe_open(str(self.dir / f), framework="pt") for f in files}
        self._where = {k: f for f, h in self._handles.items() for k in h.keys()}

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._handles[self._where[key]].get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _as_list(models: Models) -> list[torch.nn.Module]:
    return list(models) if isinstance(models, Sequence) else [models]


def _tp() -> tuple[int, int, Any]:
    return axes.rank("tp"), axes.size("tp"), axes.group("tp")


def hf_model_config(hf_dir: str | Path, make_vocab_size_divisible_by: int = 128) -> ModelConfig:
    """:class:`ModelConfig` described by an HF folder's ``config.json``."""
    return model_config_from_hf(
        read_hf_config(hf_dir),
        where=str(Path(hf_dir) / "config.json"),
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
    )


@torch.no_grad()
def load_full_state_dict(models: Models, full: Mapping[str, torch.Tensor], model_cfg: ModelConfig) -> None:
    """Copy this rank's slice of a full megatron state dict into the model chunk(s), in place.

    Call before ``make_trainable``: a bf16 run's optimizer keeps fp32 master copies made
    at construction (or call ``optimizer.reload_model_params()`` afterwards).
    """
    tp_rank, tp_size, _ = _tp()
    for model in _as_list(models):
        gpt = unwrap(model)
        own = gpt.state_dict(keep_vars=True)
        for local_key, full_key in local_to_full_keys(gpt, model_cfg).items():
            target = own[local_key]
            value = shard(full[full_key], full_key, tp_rank, tp_size, target.shape)
            if value.shape != target.shape:
                raise HFConversionError(
                    f"{full_key}: converted shard has shape {tuple(value.shape)} but the "
                    f"model's {local_key} has {tuple(target.shape)} (tp={tp_size})"
                )
            target.copy_(value.to(target.dtype))


def import_hf(models: Models, hf_dir: str | Path, model_cfg: ModelConfig) -> None:
    """Load an HF Llama/Qwen2 folder into this rank's model chunk(s) (any TP/PP layout).

    Raises :class:`HFConversionError` when the folder's architecture is unsupported or its
    config disagrees with ``model_cfg`` (naming the fields).
    """
    hf_dir = Path(hf_dir)
    hf_cfg = hf_model_config(hf_dir, model_cfg.make_vocab_size_divisible_by)
    check_compatible(model_cfg, hf_cfg, where=str(hf_dir / "config.json"))
    chunks = _as_list(models)
    keys = needed_full_keys(chunks, model_cfg)
    full = hf_to_megatron(LazySafetensors(hf_dir), model_cfg, keys=keys, where=str(hf_dir))
    load_full_state_dict(chunks, full, model_cfg)


def _pieces(gpt: torch.nn.Module, model_cfg: ModelConfig) -> list[list[tuple[str, str]]]:
    """This chunk's (local key, full key) pairs in pieces of at most a layer: the embedding, each
    layer, the final norm, the output layer (the tied copy of the embedding left out)."""
    pieces: dict[str, list[tuple[str, str]]] = {}
    for local, full in local_to_full_keys(gpt, model_cfg).items():
        if local == "output_layer.weight" and model_cfg.tie_word_embeddings:
            continue  # the last stage's copy of the tied embedding; the first stage exports it
        name = ".".join(full.split(".")[:3]) if full.startswith("decoder.layers.") else full.rsplit(".", 1)[0]
        pieces.setdefault(name, []).append((local, full))
    return list(pieces.values())


@torch.no_grad()
def gather_full_state_dict(models: Models, model_cfg: ModelConfig) -> dict[str, torch.Tensor] | None:
    """The full megatron state dict (CPU tensors) on global rank 0; ``None`` on other ranks.

    Collective over the whole job: every rank must call it.
    """
    tp_rank, tp_size, tp_group = _tp()
    local: dict[str, torch.Tensor] = {}
    for model in _as_list(models):
        gpt = unwrap(model)
        own = gpt.state_dict()
        for piece in _pieces(gpt, model_cfg):
            local.update({full: gather(own[key], full, tp_group, tp_size).cpu() for key, full in piece})
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    is_source = tp_rank == 0 and axes.rank("dp") == 0
    payload = local if is_source else {}
    pp_group, pp_size = axes.group("pp"), axes.size("pp")
    first = dist.get_global_rank(pp_group, 0) if pp_size > 1 else dist.get_rank()
    if pp_size > 1:
        gathered: list[Any] | None = [None] * pp_size if dist.get_rank() == first else None
        dist.gather_object(payload, gathered, dst=first, group=pp_group)
        payload = {k: v for part in (gathered or []) for k, v in part.items()}
    return payload if dist.get_rank() == 0 else None


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@torch.no_grad()
def export_hf(models: Models, model_cfg: ModelConfig, out_dir: str | Path, tokenizer: Any = None) -> Path | None:
    """Write an HF folder that ``transformers`` loads, streamed (collective over the job).

    Each pipeline stage's writer (tensor-parallel rank 0 of the first data / context-parallel
    replica) gathers one piece at a time over tensor parallelism (the embedding, a layer, the
    final norm, the output layer), converts it and writes it as a safetensors file of its own, so
    no rank ever holds more than a piece of the model. Global rank 0 then writes
    ``model.safetensors.index.json``, ``config.json`` and the tokenizer, and renames the folder
    into place (a half-written export never has the final name). Returns the folder on rank 0,
    ``None`` elsewhere; all ranks return after it exists.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    tp_rank, tp_size, tp_group = _tp()
    writer = tp_rank == 0 and axes.rank("dp") == 0 and axes.rank("cp") == 0
    stage = axes.rank("pp")
    weight_map: dict[str, str] = {}
    total, dtype = 0, None
    for chunk, model in enumerate(_as_list(models)):
        gpt = unwrap(model)
        own = gpt.state_dict()
        for index, piece in enumerate(_pieces(gpt, model_cfg)):
            full = {full_key: gather(own[local], full_key, tp_group, tp_size).cpu() for local, full_key in piece}
            if not writer:
                continue
            hf_piece = megatron_to_hf(full, model_cfg, partial=True)
            name = f"model-stage{stage:03d}-chunk{chunk}-{index:05d}.safetensors"
            save_file(hf_piece, str(tmp / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(hf_piece, name))
            total += sum(t.numel() * t.element_size() for t in hf_piece.values())
            dtype = dtype or str(next(iter(hf_piece.values())).dtype).replace("torch.", "")
    parts = [(weight_map, total, dtype)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size() if rank == 0 else None
        dist.gather_object((weight_map, total, dtype), parts, dst=0)
    if rank == 0:
        merged = {k: v for part in parts for k, v in part[0].items()}
        index = {"metadata": {"total_size": sum(p[1] for p in parts)}, "weight_map": dict(sorted(merged.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        dtype = next(p[2] for p in parts if p[2])
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(model_cfg, dtype=dtype), indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    _barrier()
    return out_dir if rank == 0 else None
