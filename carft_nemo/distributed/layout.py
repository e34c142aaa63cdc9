"""Parallel layout: validate TP/PP/CP/DP sizes, start torch.distributed and megatron's groups.

One entry point, :func:`initialize`, serves the three ways processes are started:
torchrun (``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``), Slurm's ``srun``
(``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``; master address from the first host of
the job), and Ray actors, which pass a :class:`ProcessInfo` explicitly to form their own
group. :func:`validate_layout` runs before any process group exists, so a bad layout fails
with a message that names the key instead of a hang or a megatron assertion.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from carft_nemo import compat
from carft_nemo.config import ConfigError, require
from carft_nemo.distributed import axes, cpu_compat, device, slurm

CP_COMM_TYPES = ("p2p", "all_gather", "a2a", "a2a+p2p")
RECOMPUTE = ("none", "selective", "full")


@dataclass
class ParallelConfig:
    """Model-parallel sizes; data parallel is whatever the world size leaves."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    context_parallel: int = 1  # TE's attention on GPUs, ours (models/cp_attention.py) without TE
    # how TE's attention exchanges keys and values over the context-parallel group (megatron's
    # cp_comm_type): a ring of point-to-point sends overlapped with compute, or all_gather, a2a, a2a+p2p
    cp_comm_type: str = "p2p"
    # activation recompute (megatron's): selective recomputes core attention in the backward,
    # full every layer from its input (one layer's activations live at a time)
    recompute: str = "none"
    sequence_parallel: bool = False  # needs TE/apex norms (GPU)
    use_distributed_optimizer: bool = False
    # share of each rank's optimizer shard (fp32 master weights, Adam moments and the Adam step)
    # kept and run in host memory: megatron-core's hybrid CPU/GPU optimizer, which it builds on
    # Transformer Engine's precision-aware Adam; needs the distributed optimizer and a GPU
    optimizer_offload_fraction: float = 0.0
    timeout_minutes: int = 30

    def __post_init__(self) -> None:
        for name in ("tensor_parallel", "pipeline_parallel", "context_parallel", "timeout_minutes"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, name, f"must be an integer >= 1, got {value!r}")
        require(self.recompute in RECOMPUTE, "recompute", f"must be one of {RECOMPUTE}, got {self.recompute!r}")
        offload = self.optimizer_offload_fraction
        require(0 <= offload <= 1, "optimizer_offload_fraction", f"must be in [0, 1], got {offload}")
        require(
            not offload or self.use_distributed_optimizer,
            "optimizer_offload_fraction",
            "offloads the distributed optimizer's shard: set use_distributed_optimizer: true",
        )
        require(
            self.cp_comm_type in CP_COMM_TYPES,
            "cp_comm_type",
            f"must be one of {CP_COMM_TYPES}, got {self.cp_comm_type!r}",
        )

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.context_parallel

    @property
    def sequence_multiple(self) -> int:
        """Sequence lengths must divide by TP (sequence parallel) and by 2 x CP (context parallel)."""
        multiple = self.tensor_parallel if self.sequence_parallel else 1
        return math.lcm(multiple, 2 * self.context_parallel) if self.context_parallel > 1 else multiple


@dataclass(frozen=True)
class ProcessInfo:
    """Where this process sits in the job: enough to join the rendezvous."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    def __post_init__(self) -> None:
        require(self.world_size >= 1, "WORLD_SIZE", f"must be >= 1, got {self.world_size}")
        require(0 <= self.rank < self.world_size, "RANK", f"{self.rank} is not in [0, world size {self.world_size})")
        require(self.local_rank >= 0, "LOCAL_RANK", f"must be >= 0, got {self.local_rank}")
        require(0 < self.master_port < 65536, "MASTER_PORT", f"{self.master_port} is not a TCP port")
        require(bool(self.master_addr), "MASTER_ADDR", "is empty")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ProcessInfo:
        """Read torchrun's variables, else Slurm's (``srun``); a single process when neither is set.

        torchrun: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``.
        Slurm: ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``; the master is
        ``MASTER_ADDR`` if exported, else the first host of ``SLURM_STEP_NODELIST`` /
        ``SLURM_JOB_NODELIST``; the port ``MASTER_PORT``, else one derived from the job id so
        that concurrent jobs on a node do not collide.
        """
        env = os.environ if env is None else env
        if "RANK" in env and "WORLD_SIZE" in env:
            return cls(
                _int(env, "RANK"),
                _int(env, "WORLD_SIZE"),
                _int(env, "LOCAL_RANK", 0),
                env.get("MASTER_ADDR") or "127.0.0.1",
                _int(env, "MASTER_PORT", 29500),
            )
        if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
            port = _int(env, "MASTER_PORT") if env.get("MASTER_PORT") else 20000 + _int(env, "SLURM_JOB_ID", 0) % 20000
            return cls(
                _int(env, "SLURM_PROCID"),
                _int(env, "SLURM_NTASKS"),
                _int(env, "SLURM_LOCALID", 0),
                env.get("MASTER_ADDR") or slurm.first_host(env),
                port,
            )
        return cls(0, 1, 0, env.get("MASTER_ADDR") or "127.0.0.1", _int(env, "MASTER_PORT", 0) or free_port())


def check_sequence_room(parallel: ParallelConfig, longest: int, where: str) -> None:
    """At start-up: context parallelism cuts every sequence into 2 x CP chunks, so the longest
    sequence of the run (``where`` names the keys that set it) must give each at least one token."""
    cp = parallel.context_parallel
    require(
        cp == 1 or longest >= 2 * cp,
        "parallel.context_parallel",
        f"{cp} needs sequences of at least {2 * cp} tokens (2 chunks a rank); the longest is {longest} ({where})",
    )


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    """An integer environment variable; a clear error naming it when malformed."""
    raw = env.get(name)
    if raw is None or raw == "":
        if default is None:
            raise ConfigError(f"{name}: environment variable is required")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}: environment variable must be an integer, got {raw!r}") from None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (for a rendezvous we are about to start)."""
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def current_world_size() -> int:
    """The job's world size: the live process group's, else what the launcher's variables say."""
    return dist.get_world_size() if dist.is_initialized() else ProcessInfo.from_env().world_size


def validate_layout(
    parallel: ParallelConfig,
    world_size: int,
    *,
    key: str = "parallel",
    num_layers: int | None = None,
    num_attention_heads: int | None = None,
    num_query_groups: int | None = None,
) -> int:
    """Check the layout against the world size and the model; return the data-parallel size.

    Raises :class:`ConfigError` naming the offending key, ``<key>.<field>`` (``key`` is where
    the layout sits in the run's config: ``parallel``, ``critic.parallel``, ...). Runs without
    any process group.
    """
    tp, pp, cp = parallel.tensor_parallel, parallel.pipeline_parallel, parallel.context_parallel
    require(
        world_size % parallel.model_parallel_size == 0,
        key,
        f"world size {world_size} is not divisible by tensor_parallel*pipeline_parallel*context_parallel "
        f"= {tp}*{pp}*{cp} = {parallel.model_parallel_size}",
    )
    if num_attention_heads is not None:
        require(
            num_attention_heads % tp == 0,
            f"{key}.tensor_parallel",
            f"{tp} does not divide model.num_attention_heads={num_attention_heads}",
        )
    if num_query_groups is not None:
        require(
            num_query_groups % tp == 0,
            f"{key}.tensor_parallel",
            f"{tp} does not divide model.num_query_groups={num_query_groups} (key/value heads)",
        )
    if cp > 1 and parallel.cp_comm_type == "a2a":  # TE's all-to-all trades sequence chunks for heads
        for name, heads in (("num_attention_heads", num_attention_heads), ("num_query_groups", num_query_groups)):
            require(
                heads is None or (heads // tp) % cp == 0,
                f"{key}.cp_comm_type",
                f"a2a splits each tensor-parallel rank's heads over context_parallel={cp}, but model.{name}="
                f"{heads} / tensor_parallel={tp} does not divide by it: use p2p or all_gather",
            )
    if num_layers is not None:
        require(
            pp <= num_layers,
            f"{key}.pipeline_parallel",
            f"{pp} stages for model.num_layers={num_layers}: more stages than layers",
        )
        require(
            num_layers % pp == 0,
            f"{key}.pipeline_parallel",
            f"{pp} does not divide model.num_layers={num_layers} (uneven stages are not supported)",
        )
    if parallel.sequence_parallel:
        require(
            device.has_cuda(),
            f"{key}.sequence_parallel",
            "sequence parallel needs Transformer Engine or apex norms (GPU only)",
        )
        require(tp > 1, f"{key}.sequence_parallel", "only meaningful with tensor_parallel > 1")
    if parallel.optimizer_offload_fraction:
        require(
            device.has_cuda() and compat.transformer_engine_available(),
            f"{key}.optimizer_offload_fraction",
            "megatron-core offloads optimizer states through Transformer Engine's precision-aware Adam "
            "(GPU with Transformer Engine only); set it to 0 here",
        )
    return world_size // parallel.model_parallel_size


def check_model_layout(parallel: ParallelConfig, world_size: int, model: Any, *, key: str = "parallel") -> int:
    """:func:`validate_layout` with the model's shape (a ``ModelConfig``); returns the DP size."""
    return validate_layout(parallel, world_size, key=key, **model.layout_dims)


@dataclass(frozen=True)
class ParallelLayout:
    """This rank's coordinates; process groups by axis name (:mod:`carft_nemo.distributed.axes`)."""

    rank: int
    world_size: int
    tensor_parallel: int
    pipeline_parallel: int
    context_parallel: int
    data_parallel: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    cp_rank: int = 0
    # the rank along data x context parallel: generation's replica (context-parallel ranks hold
    # full weights, so each generates its own prompts; carft_nemo.distributed.replicas)
    generation_replica: int = -1

    def __post_init__(self) -> None:
        if self.generation_replica < 0:  # without context parallelism the data-parallel replica
            object.__setattr__(self, "generation_replica", self.dp_rank * self.context_parallel + self.cp_rank)

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pipeline_parallel - 1

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0

    def group(self, axis: str) -> dist.ProcessGroup | None:
        """Process group of a named axis: "tp", "pp", "dp", "cp", "dp_cp", "mp"."""
        return axes.group(axis)


def initialize(
    parallel: ParallelConfig,
    *,
    seed: int = 1234,
    process: ProcessInfo | None = None,
    num_layers: int | None = None,
    num_attention_heads: int | None = None,
    num_query_groups: int | None = None,
) -> ParallelLayout:
    """Validate, then start torch.distributed (if needed) and megatron's parallel groups.

    Idempotent for the process group: an existing one (e.g. made by a test launcher) is
    reused. Megatron's model-parallel state is rebuilt on every call, so one process can
    switch layouts (tests compare TP=1 against TP=2 in the same processes).
    """
    process = process or (ProcessInfo.from_env() if not dist.is_initialized() else None)
    world = dist.get_world_size() if dist.is_initialized() else process.world_size
    data_parallel = validate_layout(
        parallel,
        world,
        num_layers=num_layers,
        num_attention_heads=num_attention_heads,
        num_query_groups=num_query_groups,
    )
    cpu_compat.apply()
    if not dist.is_initialized():
        device.bind_local_device(process.local_rank)
        device.configure_transport(process.master_addr)
        dist.init_process_group(
            backend=device.backend(),
            init_method=f"tcp://{process.master_addr}:{process.master_port}",
            rank=process.rank,
            world_size=process.world_size,
            timeout=timedelta(minutes=parallel.timeout_minutes),
        )
    from megatron.core import tensor_parallel

    axes.build(
        parallel.tensor_parallel, parallel.pipeline_parallel, parallel.context_parallel, parallel.timeout_minutes
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return ParallelLayout(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        tensor_parallel=parallel.tensor_parallel,
        pipeline_parallel=parallel.pipeline_parallel,
        context_parallel=parallel.context_parallel,
        data_parallel=data_parallel,
        tp_rank=axes.rank("tp"),
        pp_rank=axes.rank("pp"),
        dp_rank=axes.rank("dp"),
        cp_rank=axes.rank("cp"),
        generation_replica=axes.rank("dp_cp"),
    )


def shutdown() -> None:
    """Tear down megatron's groups and the process group (safe to call twice)."""
    axes.destroy()
    if dist.is_initialized():
        dist.destroy_process_group()


__all__ = [
    "ConfigError",
    "ParallelConfig",
    "ParallelLayout",
    "ProcessInfo",
    "free_port",
    "initialize",
    "shutdown",
    "validate_layout",
]
