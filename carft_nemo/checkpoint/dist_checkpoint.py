"""Distributed training checkpoints: model + optimizer + LR schedule + RNG + data position.

Written with megatron's ``dist_checkpointing`` (``torch_dist`` format): every tensor is
stored with its global shape and offset, so a checkpoint saved at one TP/PP layout loads
at another (model weights and Adam moments; the Adam moments of the distributed optimizer
are saved ``fully_reshardable``). RNG states are per rank and restored only when the layout
is the same (a different layout has different ranks, so there is nothing to map them to).

A checkpoint is complete or absent::

    <root>/.tmp-step_N/   every rank writes its shards here, then barrier
    <root>/.tmp-step_N/checkpoint.json, COMPLETE   written by rank 0 (COMPLETE last)
    <root>/step_N/        rank 0 renames the folder (atomic on one file system), barrier

so a crash at any point leaves either no ``step_N`` or a complete one, and
:func:`find_latest_checkpoint` only ever returns complete folders. Rank 0 then deletes all
but the newest ``keep_last`` checkpoints.

Several model groups (policy, critic) go into one checkpoint under their names; each
group's tensors are keyed ``<name>.<megatron key>`` so they cannot collide.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException as TorchCheckpointException

from carft_nemo import compat
from carft_nemo.checkpoint.rng import capture_rng_state, restore_rng_state
from carft_nemo.config import ConfigError
from carft_nemo.distributed import axes
from carft_nemo.models.forward import unwrap
from carft_nemo.training.optim import TrainableModel

log = logging.getLogger(__name__)

POLICY_GROUP = "policy"  # the policy's group name in SFT and actor checkpoints (RL stages load it)
METADATA_FILE = "checkpoint.json"
COMPLETE_MARKER = "COMPLETE"
FORMAT = "torch_dist"
_STEP_DIR = re.compile(r"^step_(\d+)$")

Trainables = Mapping[str, TrainableModel | torch.nn.Module]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the models; names the path."""


@dataclass
class CheckpointInfo:
    """What :func:`load_checkpoint` restored besides tensors."""

    path: Path
    step: int
    data_state: dict[str, Any]
    metadata: dict[str, Any]
    restored_rng: bool
    restored_optimizer: bool
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- layout / paths


def current_layout() -> dict[str, int]:
    """This job's parallel sizes, stored with the checkpoint to decide what can be restored."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    layout = {
        "world_size": world,
        "tensor_parallel": axes.size("tp"),
        "pipeline_parallel": axes.size("pp"),
        "data_parallel": axes.size("dp"),
    }
    if axes.size("cp") > 1:  # absent at 1, so checkpoints written before context parallelism still match
        layout["context_parallel"] = axes.size("cp")
    return layout


def is_complete(path: str | Path) -> bool:
    path = Path(path)
    return (path / COMPLETE_MARKER).is_file() and (path / METADATA_FILE).is_file()


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as (step, path), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and is_complete(p)]
    return sorted(found)


def find_latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete ``step_N`` folder under ``root`` (temp and unmarked folders ignored)."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a complete checkpoint; :class:`CheckpointError` naming what is wrong otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: does not exist")
    if not is_complete(path):
        raise CheckpointError(
            f"checkpoint {path}: incomplete (no {COMPLETE_MARKER} marker or {METADATA_FILE}); "
            "it was interrupted while being written"
        )
    return json.loads((path / METADATA_FILE).read_text())


def resolve_checkpoint(path: str | Path) -> Path:
    """``path`` itself if it is a checkpoint folder, else the newest complete one under it."""
    path = Path(path)
    if (path / METADATA_FILE).exists() or _STEP_DIR.match(path.name) or path.name.startswith(".tmp-"):
        return path
    latest = find_latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"no complete checkpoint (step_N with {COMPLETE_MARKER}) under {path}")
    return latest


def common_steps(roots: Sequence[str | Path]) -> list[int]:
    """Steps with a complete checkpoint under every root (one root per role of a run), ascending."""
    steps = [{s for s, _ in list_checkpoints(r)} for r in roots]
    return sorted(set.intersection(*steps)) if steps else []


def prune_checkpoints(
    roots: str | Path | Sequence[str | Path], keep_last: int, protect: Sequence[int] = ()
) -> list[Path]:
    """Keep the newest ``keep_last`` steps complete under every root; delete older ones.

    One root for a single model group (SFT), one per role for RL (actor, critic): a step is
    only kept whole, so a crash between two roles' saves never leaves a resume point with a
    missing role. Complete steps older than the newest kept one and not kept themselves go
    (also one role's orphan of a save the other roles never finished), as do interrupted
    saves (``.tmp-step_N``) older than it; newer folders stay (they may be being written).
    ``keep_last <= 0`` keeps everything. Steps in ``protect`` (the collapse guard's best
    checkpoint) are kept whatever their age. Returns the deleted paths.
    """
    roots = [Path(roots)] if isinstance(roots, (str, Path)) else [Path(r) for r in roots]
    kept = common_steps(roots)[-keep_last:] if keep_last > 0 else []
    if not kept:
        return []
    keep, newest = set(kept) | set(protect), kept[-1]
    doomed = []
    for root in roots:
        doomed += [p for s, p in list_checkpoints(root) if s not in keep and s < newest]
        for p in root.glob(".tmp-step_*"):
            step = p.name[len(".tmp-step_") :]
            if step.isdigit() and int(step) < newest:
                doomed.append(p)  # an interrupted save older than a complete one: never resumable
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def discard_checkpoints_after(roots: Sequence[str | Path], step: int) -> list[Path]:
    """Delete every checkpoint newer than ``step`` under every root (a run rewound to ``step``
    abandons them: a resume must not take one of them up). Returns the deleted paths."""
    doomed = [p for root in roots for s, p in list_checkpoints(root) if s > step]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


# ---------------------------------------------------------------------------- state assembly


def _parts(entry: TrainableModel | torch.nn.Module) -> tuple[torch.nn.Module, Any, Any]:
    if isinstance(entry, TrainableModel):
        return unwrap(entry.model), entry.optimizer, entry.scheduler
    return unwrap(entry), None, None


def _rng_sharded_object() -> Any:
    """This rank's RNG states as a ShardedObject indexed by (pp, tp, dp[, cp]) rank (cp only when > 1,
    so the keys of checkpoints written before context parallelism stay the same)."""
    from megatron.core.dist_checkpointing import ShardedObject

    shape = (axes.size("pp"), axes.size("tp"), axes.size("dp"))
    offset = (axes.rank("pp"), axes.rank("tp"), axes.rank("dp"))
    if axes.size("cp") > 1:
        shape, offset = (*shape, axes.size("cp")), (*offset, axes.rank("cp"))
    return ShardedObject("rng_state", capture_rng_state(), shape, offset, replica_id=0)


def _optimizer_has_state(optimizer: Any) -> bool:
    """Whether Adam has moments yet: a model saved before its first update (the actor during
    the critic's warm-up) has none, and loading expects the moments a checkpoint holds."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return bool(getattr(inner, "state", None))


def _reset_optimizer_state(optimizer: Any) -> None:
    """Back to no moments, as at the save of a model that had not been updated yet."""
    getattr(optimizer, "optimizer", optimizer).state.clear()


def _sharded_state(
    models: Trainables,
    *,
    is_loading: bool,
    with_optimizer: bool,
    with_rng: bool,
    data_state: Mapping[str, Any] | None,
    with_scheduler: bool,
) -> dict[str, Any]:
    state: dict[str, Any] = {"models": {}}
    for name, entry in models.items():
        gpt, optimizer, scheduler = _parts(entry)
        model_sd = gpt.sharded_state_dict(prefix=f"{name}.")
        group: dict[str, Any] = {"model": model_sd}
        if with_optimizer and optimizer is not None:
            group["optimizer"] = compat.optimizer_sharded_state_dict(optimizer, model_sd, is_loading=is_loading)
        if with_scheduler and scheduler is not None:
            group["scheduler"] = scheduler.state_dict()
        state["models"][name] = group
    if with_rng:
        state["rng"] = _rng_sharded_object()
    state["data_state"] = dict(data_state or {})
    return state


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


# ---------------------------------------------------------------------------- save / load


def save_checkpoint(
    root: str | Path,
    step: int,
    models: Trainables,
    *,
    data_state: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    keep_last: int = 0,
) -> Path:
    """Write ``<root>/step_<step>`` (collective: every rank calls it) and return its path.

    ``models`` maps a group name to a :class:`TrainableModel` (weights + Adam state + LR
    schedule) or a bare model (weights only). ``data_state`` is the data position (e.g.
    ``{"epoch": 1, "consumed": 4096}``, JSON-serialisable, the same on every rank);
    ``metadata`` (e.g. the resolved config) goes into ``checkpoint.json``.
    """
    from megatron.core import dist_checkpointing

    root = Path(root)
    final, tmp = root / f"step_{step}", root / f".tmp-step_{step}"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an interrupted save of this step
        tmp.mkdir(parents=True)
    _barrier()
    trainables = [m for m in models.values() if isinstance(m, TrainableModel)]
    has_optimizer = any(_optimizer_has_state(m.optimizer) for m in trainables)
    state = _sharded_state(
        models,
        is_loading=False,
        with_optimizer=has_optimizer,
        with_scheduler=bool(trainables),
        with_rng=True,
        data_state=data_state,
    )
    dist_checkpointing.save(state, str(tmp))
    _barrier()
    if _rank() == 0:
        info = {
            "step": step,
            "format": FORMAT,
            "megatron_core": str(compat.MEGATRON_VERSION),
            "layout": current_layout(),
            "models": sorted(models),
            "has_optimizer": has_optimizer,  # Adam moments (none before a model's first update)
            "has_scheduler": bool(trainables),
            "data_state": dict(data_state or {}),
            "metadata": dict(metadata or {}),
            "saved_at": time.time(),
        }
        (tmp / METADATA_FILE).write_text(json.dumps(info, indent=2, sort_keys=True, default=str))
        (tmp / COMPLETE_MARKER).write_text(f"{step}\n")
        if final.exists():
            shutil.rmtree(final)  # re-saving a step (e.g. after a resume) replaces it
        tmp.rename(final)
        prune_checkpoints(root, keep_last)
    _barrier()
    return final


def _strip(prefix: str, sd: Mapping[str, Any]) -> dict[str, Any]:
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in sd.items()}


def load_checkpoint(
    path: str | Path, models: Trainables, *, load_optimizer: bool = True, load_rng: bool = True
) -> CheckpointInfo:
    """Restore ``models`` (and optionally optimizer, LR schedule, RNG) from a checkpoint.

    ``path`` is a ``step_N`` folder or a root holding them (the newest complete one is
    used). Weights and Adam moments load at any TP/PP layout; RNG states only at the
    layout they were saved in (skipped with a warning otherwise). Collective.
    """
    from megatron.core import dist_checkpointing

    path = resolve_checkpoint(path)
    meta = read_metadata(path)
    missing = sorted(set(models) - set(meta["models"]))
    if missing:
        raise CheckpointError(f"checkpoint {path}: has no model group(s) {missing}; it holds {meta['models']}")
    same_layout = meta["layout"] == current_layout()
    with_rng = load_rng and same_layout
    if load_rng and not same_layout:
        log.warning(
            "checkpoint %s was saved with layout %s, running %s: RNG states not restored",
            path,
            meta["layout"],
            current_layout(),
        )
    with_optimizer = load_optimizer and meta.get("has_optimizer", False)
    with_scheduler = load_optimizer and meta.get("has_scheduler", meta.get("has_optimizer", False))
    state = _sharded_state(
        models,
        is_loading=True,
        with_optimizer=with_optimizer,
        with_scheduler=with_scheduler,
        with_rng=with_rng,
        data_state=None,
    )
    try:
        loaded = dist_checkpointing.load(state, str(path))
    # megatron raises CheckpointingException / KeyError; torch.distributed.checkpoint's
    # CheckpointException (shape mismatches) derives from BaseException, not Exception
    except (Exception, TorchCheckpointException) as err:
        summary = str(err).strip().splitlines()
        raise CheckpointError(
            f"checkpoint {path}: could not load into the current models "
            f"(different architecture or model names?): {' | '.join(summary[-3:])}"
        ) from err
    restored_optimizer = False
    for name, entry in models.items():
        gpt, optimizer, scheduler = _parts(entry)
        group = loaded["models"][name]
        gpt.load_state_dict(_strip(f"{name}.", group["model"]), strict=True)
        if with_optimizer and optimizer is not None:
            optimizer.load_state_dict(group["optimizer"])
            restored_optimizer = True
        elif load_optimizer and optimizer is not None and meta.get("has_scheduler", False):
            # saved before the model's first update (no moments): back to none, not the current ones
            _reset_optimizer_state(optimizer)
            restored_optimizer = True
        if with_scheduler and scheduler is not None and "scheduler" in group:
            scheduler.num_steps = 0  # megatron's load adds the saved count to the current one
            scheduler.load_state_dict(group["scheduler"])
    if with_rng:
        restore_rng_state(loaded["rng"])
    _barrier()
    return CheckpointInfo(
        path=path,
        step=int(meta["step"]),
        data_state=dict(loaded.get("data_state", {})),
        metadata=meta,
        restored_rng=with_rng,
        restored_optimizer=restored_optimizer,
    )


def load_model_weights(
    path: str | Path, name: str, model: torch.nn.Module, *, skip_prefixes: tuple[str, ...] = ()
) -> Path:
    """Initialise ``model`` from group ``name`` of a checkpoint, weights only (collective).

    For a new stage started from an earlier one (PPO actor and critic from SFT): the
    optimizer, RNG and data position are not restored, and parameters whose key starts with
    one of ``skip_prefixes`` (heads the checkpoint does not have, e.g. a fresh value head
    ``output_layer.`` of a critic) keep their initialisation. Every other parameter must be
    in the checkpoint. Returns the resolved ``step_N`` folder.
    """
    from megatron.core import dist_checkpointing

    path = resolve_checkpoint(path)
    meta = read_metadata(path)
    if name not in meta["models"]:
        raise CheckpointError(f"checkpoint {path}: has no model group {name!r}; it holds {meta['models']}")
    gpt = unwrap(model)
    wanted = {
        k: v
        for k, v in gpt.sharded_state_dict(prefix=f"{name}.").items()
        if not k.startswith(tuple(f"{name}.{p}" for p in skip_prefixes))
    }
    try:
        loaded = dist_checkpointing.load({"models": {name: {"model": wanted}}}, str(path))
    except (Exception, TorchCheckpointException) as err:
        summary = str(err).strip().splitlines()
        raise CheckpointError(
            f"checkpoint {path}: could not initialise {name!r} from it "
            f"(different architecture?): {' | '.join(summary[-3:])}"
        ) from err
    result = gpt.load_state_dict(_strip(f"{name}.", loaded["models"][name]["model"]), strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(skip_prefixes) and not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint {path}: {name!r} lacks {missing[:5]} / has unexpected {list(result.unexpected_keys)[:5]}"
        )
    _barrier()
    return path


__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "POLICY_GROUP",
    "common_steps",
    "ConfigError",
    "current_layout",
    "find_latest_checkpoint",
    "is_complete",
    "list_checkpoints",
    "load_checkpoint",
    "load_model_weights",
    "prune_checkpoints",
    "read_metadata",
    "resolve_checkpoint",
    "save_checkpoint",
]
