"""Run a function in N spawned processes that form a gloo group on 127.0.0.1.

Used by tests/distributed/*: ``results = run_ranks(fn, world_size, *args)`` returns each
rank's return value (rank order); a failing rank raises here with its traceback.
"""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue, backend: str = "gloo") -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1",
    )
    import torch.distributed as dist

    try:
        if backend == "nccl":  # tests/gpu: one GPU a rank
            import torch

            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        queue.put((rank, True, fn(rank, world_size, *args)))
    except BaseException:  # noqa: BLE001 - forwarded to the parent with its traceback
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 600, backend: str = "gloo"
) -> list[Any]:
    """Spawn ``world_size`` processes running ``fn(rank, world_size, *args)`` in a gloo group
    (``backend="nccl"``: one GPU a rank, for tests/gpu)."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    # Not daemonic: megatron's torch_dist checkpoint writer starts worker processes of its
    # own, which Python forbids in daemons. Ranks are joined, or killed, below.
    procs = [
        ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue, backend), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    import time

    deadline = time.monotonic() + timeout
    while len(results) + len(errors) < world_size:
        if time.monotonic() > deadline:
            break
        if queue.empty():
            if not any(p.is_alive() for p in procs) and queue.empty():
                break
            time.sleep(0.05)
            continue
        rank, ok, value = queue.get()
        if ok:
            results[rank] = value
        else:
            errors.append(f"rank {rank} failed:\n{value}")
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
            p.join(timeout=10)
    if errors:
        raise RuntimeError("\n".join(errors))
    missing = [r for r in range(world_size) if r not in results]
    if missing:
        codes = {r: procs[r].exitcode for r in missing}
        raise RuntimeError(f"ranks {missing} returned nothing (exit codes {codes}; timeout {timeout}s)")
    return [results[r] for r in range(world_size)]
