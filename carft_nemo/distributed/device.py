"""The one place that names devices and collective backends.

Everything else asks this module: CPU machines run gloo, GPU machines NCCL, through the
same code path. (A lint test rejects hard-coded device/backend strings elsewhere.)
"""

from __future__ import annotations

import os

import torch


def has_cuda() -> bool:
    return torch.cuda.is_available()


def device_type() -> str:
    """'cuda' when a GPU is visible, else 'cpu'."""
    return "cuda" if has_cuda() else "cpu"


def backend() -> str:
    """Collective backend for torch.distributed: NCCL on GPU, gloo on CPU."""
    return "nccl" if has_cuda() else "gloo"


def local_device() -> torch.device:
    """This process's compute device (the LOCAL_RANK-th GPU, or the CPU)."""
    if has_cuda():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def bind_local_device() -> torch.device:
    """Make this process's GPU the current one (no-op on CPU) and return it."""
    dev = local_device()
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def default_dtype(bf16: bool) -> torch.dtype:
    """bf16 only where the hardware runs it fast (GPU); fp32 on CPU."""
    return torch.bfloat16 if bf16 and has_cuda() else torch.float32
