"""The one place that names devices and collective backends.

Everything else asks this module: CPU machines run gloo, GPU machines NCCL, through the
same code path. (A lint test rejects hard-coded device/backend strings elsewhere.)
"""

from __future__ import annotations

import os

import torch


def has_cuda() -> bool:
    return torch.cuda.is_available()


def gpu_memory_bytes() -> int | None:
    """Total memory of this process's GPU; ``None`` without one (the memory planner's limit)."""
    if not has_cuda():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory


def backend() -> str:
    """Collective backend for torch.distributed: NCCL on GPU, gloo on CPU."""
    return "nccl" if has_cuda() else "gloo"


def local_device(local_rank: int | None = None) -> torch.device:
    """This process's compute device: the ``local_rank``-th GPU (default ``$LOCAL_RANK``), or the CPU."""
    if has_cuda():
        if local_rank is None:
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def bind_local_device(local_rank: int | None = None) -> torch.device:
    """Make this process's GPU the current one (no-op on CPU) and return it.

    Also exports ``LOCAL_RANK`` when the launcher did not (Slurm, Ray), so that
    :func:`local_device` keeps answering the same device later in this process.
    """
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
    dev = local_device(local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def default_dtype(bf16: bool) -> torch.dtype:
    """bf16 only where the hardware runs it fast (GPU); fp32 on CPU."""
    return torch.bfloat16 if bf16 and has_cuda() else torch.float32


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def configure_transport(master_addr: str) -> None:
    """Bind gloo to the interface that reaches the rendezvous: loopback on one host, else the route's.

    gloo otherwise binds the interface its host name resolves to, which on sandboxed or
    multi-homed machines (host name on 127.0.1.1 or on a management network) may not reach
    the other ranks: their connections then fail or hang. Only set when the user has not chosen.
    """
    if "GLOO_SOCKET_IFNAME" in os.environ:
        return
    if master_addr in LOOPBACK_HOSTS:
        if not has_cuda():
            os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        return
    interface = interface_towards(master_addr)
    if interface is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = interface


def interface_towards(address: str) -> str | None:
    """The name of the local interface the kernel routes ``address`` through (None if unknown)."""
    import socket

    import psutil

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((address, 9))  # UDP: picks the route, sends nothing
            local = probe.getsockname()[0]
    except OSError:
        return None
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == local for a in addresses):
            return name
    return None


def synchronize() -> None:
    """Wait for queued GPU work (timing); no-op on CPU, where ops run synchronously."""
    if has_cuda():
        torch.cuda.synchronize()


def accelerator_name() -> str:
    """Human-readable name of this process's device, for benchmark records."""
    if has_cuda():
        return torch.cuda.get_device_name(local_device())
    import platform

    return platform.processor() or platform.machine() or "cpu"
