"""Named parallel axes: the one module that reads (and builds) megatron's ``parallel_state``.

Everything else asks for an axis by name, as torchtitan's device mesh does::

    "tp"     tensor parallel           "pp"  pipeline parallel
    "dp"     data parallel             "cp"  context parallel
    "dp_cp"  data x context parallel   "mp"  model parallel (tp x pp)

Before megatron's groups exist (a single process, unit tests, the RL controller) every
axis has size 1, rank 0 and group ``None``, which the collectives of
:mod:`carft_nemo.distributed.collectives` treat as "no distribution".
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

AXES = ("tp", "pp", "dp", "cp", "dp_cp", "mp")


def _ps() -> Any:
    from megatron.core import parallel_state

    return parallel_state


def initialized() -> bool:
    """True once :func:`build` made megatron's model-parallel groups in this process."""
    return _ps().model_parallel_is_initialized()


def _check(axis: str) -> None:
    if axis not in AXES:
        raise KeyError(f"unknown parallel axis {axis!r}; known: {', '.join(AXES)}")


def group(axis: str) -> dist.ProcessGroup | None:
    """The process group of ``axis`` (``None`` before :func:`build`)."""
    _check(axis)
    if not initialized():
        return None
    ps = _ps()
    getters = {
        "tp": ps.get_tensor_model_parallel_group,
        "pp": ps.get_pipeline_model_parallel_group,
        "dp": lambda: ps.get_data_parallel_group(with_context_parallel=False),
        "dp_cp": lambda: ps.get_data_parallel_group(with_context_parallel=True),
        "cp": ps.get_context_parallel_group,
        "mp": ps.get_model_parallel_group,
    }
    return getters[axis]()


# axis -> megatron's (size, rank) getters; the other axes ask their process group
_SIZE_AND_RANK = {
    "tp": ("get_tensor_model_parallel_world_size", "get_tensor_model_parallel_rank"),
    "pp": ("get_pipeline_model_parallel_world_size", "get_pipeline_model_parallel_rank"),
    "dp": ("get_data_parallel_world_size", "get_data_parallel_rank"),
    "cp": ("get_context_parallel_world_size", "get_context_parallel_rank"),
}


def size(axis: str) -> int:
    """Ranks along ``axis`` (1 before :func:`build`)."""
    _check(axis)
    if not initialized():
        return 1
    if axis in _SIZE_AND_RANK:
        return getattr(_ps(), _SIZE_AND_RANK[axis][0])()
    return dist.get_world_size(group(axis))


def rank(axis: str) -> int:
    """This process's rank along ``axis`` (0 before :func:`build`)."""
    _check(axis)
    if not initialized():
        return 0
    if axis in _SIZE_AND_RANK:
        return getattr(_ps(), _SIZE_AND_RANK[axis][1])()
    return dist.get_rank(group(axis))


def is_first_stage() -> bool:
    """This rank holds the first pipeline stage (the embedding)."""
    return not initialized() or _ps().is_pipeline_first_stage()


def is_last_stage() -> bool:
    """This rank holds the last pipeline stage (the output layer and the loss)."""
    return not initialized() or _ps().is_pipeline_last_stage()


def last_stage_rank() -> int:
    """Global rank of the last stage of this rank's pipeline (the source of per-batch results)."""
    return _ps().get_pipeline_model_parallel_last_rank()


def previous_stage_rank() -> int:
    """Global rank of the pipeline stage before this one (what this stage receives from)."""
    return _ps().get_pipeline_model_parallel_prev_rank()


def next_stage_rank() -> int:
    """Global rank of the pipeline stage after this one (what this stage sends to)."""
    return _ps().get_pipeline_model_parallel_next_rank()


def tensor_parallel_source_rank() -> int:
    """Global rank of tensor-parallel rank 0 in this rank's group (the source of TP broadcasts)."""
    return _ps().get_tensor_model_parallel_src_rank()


def build(tensor_parallel: int, pipeline_parallel: int, context_parallel: int, timeout_minutes: int) -> None:
    """(Re)build megatron's groups for a layout (an existing set is destroyed first)."""
    from carft_nemo import compat

    destroy()
    compat.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        context_parallel_size=context_parallel,
        distributed_timeout_minutes=timeout_minutes,
    )


def destroy() -> None:
    """Tear down megatron's groups (safe when there are none)."""
    if initialized():
        _ps().destroy_model_parallel()


__all__ = [
    "AXES",
    "build",
    "destroy",
    "group",
    "initialized",
    "is_first_stage",
    "is_last_stage",
    "last_stage_rank",
    "next_stage_rank",
    "previous_stage_rank",
    "rank",
    "size",
    "tensor_parallel_source_rank",
]
