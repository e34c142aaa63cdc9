"""Groups of Ray actors: a model group per role with its own torch.distributed + megatron layout.

The RL stages run several groups side by side: the actor, the critic and the reference
are :class:`RayWorkerGroup` s (N actors of one worker class that rendezvous with each other,
not with the driver, and then hold one rank of a TP/PP/DP layout each); the reward pool is
a plain :class:`WorkerGroup` of independent workers. Both answer the same calls:
``submit(Protocol.method, ...)`` on every rank (SPMD: all ranks must take part in
collectives) and ``submit_rows`` with each data-parallel replica's part of a batch.

Worker classes follow the Impl + thin wrapper pattern: a plain Python class (deriving from
:class:`ParallelWorker` for model groups) holds all the logic and is testable in-process;
the group wraps it with ``ray.remote`` at creation time. Their contracts (methods, batch
keys and shapes) are written in :mod:`carft_nemo.workers.contracts`.

Rendezvous: rank 0's actor reports its node address and a free port; every actor then
calls :func:`carft_nemo.distributed.layout.initialize` with an explicit
:class:`ProcessInfo`, concurrently (``init_process_group`` blocks until all ranks arrive).
On GPU nodes Ray sets ``CUDA_VISIBLE_DEVICES`` per actor, so each actor's local rank is 0.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from carft_nemo.config import ConfigError, require
from carft_nemo.distributed import device
from carft_nemo.distributed.layout import ParallelConfig, ParallelLayout, ProcessInfo, free_port, validate_layout
from carft_nemo.distributed.placement import (
    NODE_RESOURCE_TOTAL,
    WorkerLocation,
    actor_options,
    node_address,
    node_resource,
    rank_nodes,
    unreachable_nodes,
    where_am_i,
)
from carft_nemo.distributed.replicas import ReplicaMap, Rows, split_rows

PLACEMENT_TIMEOUT_S = 300.0  # how long a group's actors may wait for a node with their resources


def start_local_ray(num_cpus: int, *, address: str | None = None, num_gpus: int | None = None) -> bool:
    """Connect to the Ray cluster at ``address`` (or ``$RAY_ADDRESS``), else start one on this host.

    A local cluster is always a new one (never a head an earlier ``ray start`` recorded on the
    host), binds to loopback without the dashboard, and without writing an auth
    token (``RAY_AUTH_MODE=disabled`` unless set): tests and single-node runs stay local.
    It is node 0 for ``<role>.nodes`` (:mod:`carft_nemo.distributed.placement`).
    Workers inherit this process's ``sys.path`` through ``PYTHONPATH`` so that worker
    classes defined in the driver's modules import in the actors. Returns True only when
    this call started a local instance: its caller then owns it and shuts it down; an
    instance already up (see :func:`shared_ray`) or a given cluster is left alone.
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    share_sys_path()
    attempts_left = 3  # a loaded host can miss Ray's fixed 30 s node start-up deadline
    while True:
        try:
            # address="local": without it ray.init() joins whatever head `ray start` last recorded on this
            # host (<ray temp dir>/ray_current_cluster), a file a stopped or killed head leaves behind.
            ray.init(
                address="local",
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                _node_ip_address="127.0.0.1",
                resources={node_resource(0): NODE_RESOURCE_TOTAL},
                include_dashboard=False,
                log_to_driver=True,
            )
            return True
        except Exception as err:  # noqa: BLE001 - Ray raises plain Exception on a start-up timeout
            attempts_left -= 1
            if not attempts_left or "timed out" not in str(err).lower():
                raise
            ray.shutdown()


def share_sys_path() -> None:
    """Put this process's ``sys.path`` on ``PYTHONPATH``, which the Ray processes it starts inherit."""
    import sys

    paths = [p for p in sys.path if p and os.path.isdir(p)]
    os.environ["PYTHONPATH"] = os.pathsep.join(
        dict.fromkeys(paths + os.environ.get("PYTHONPATH", "").split(os.pathsep))
    )


@contextlib.contextmanager
def shared_ray(num_cpus: int, *, address: str | None = None) -> Iterator[None]:
    """One Ray instance for the several runs a process makes (a pipeline's RL stages, a benchmark's).

    Each run's own :func:`start_local_ray` then joins it instead of starting and stopping an
    instance of its own (seconds a run). ``num_cpus`` must cover the most workers up at once;
    0 means no run is left to make, and starts nothing. Shuts the instance down on exit if
    this call started it.
    """
    import ray

    if num_cpus < 1:
        yield
        return
    started = start_local_ray(num_cpus, address=address)
    try:
        yield
    finally:
        if started and ray.is_initialized():
            ray.shutdown()


class ParallelWorker:
    """Base Impl class: one rank of a model-parallel group living in a Ray actor (or in-process)."""

    layout: ParallelLayout | None = None

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's address and a port free on it (asked of rank 0 only)."""
        host = node_address()
        return host, free_port(host if host != "localhost" else "127.0.0.1")

    def init_parallel(
        self, parallel: ParallelConfig, process: ProcessInfo, seed: int = 1234, model_dims: dict[str, int] | None = None
    ) -> ParallelLayout:
        """Join the group and build megatron's parallel state; returns this rank's layout."""
        from carft_nemo.distributed.layout import initialize

        self.layout = initialize(parallel, seed=seed, process=process, **(model_dims or {}))
        return self.layout

    def process_id(self) -> int:
        return os.getpid()

    def shutdown_parallel(self) -> None:
        from carft_nemo.distributed.layout import shutdown

        shutdown()
        self.layout = None


def method_name(worker_cls: type, method: Callable[..., Any]) -> str:
    """The name of ``method``, a function of ``worker_cls`` or of a protocol it follows.

    Groups take methods as functions (``PolicyWorker.forward``), not strings: a typo fails
    here, on the driver, before any call, and a reader can jump to the contract.
    """
    name = getattr(method, "__name__", None)
    if not callable(method) or name is None:
        raise TypeError(f"expected a worker method (e.g. PolicyWorker.forward), got {method!r}")
    if not callable(getattr(worker_cls, name, None)):
        raise AttributeError(f"{worker_cls.__name__} has no method {name!r}")
    return name


class WorkerGroup:
    """Ray actors of one worker class, called by method, each data-parallel replica with its rows.

    :meth:`submit` starts a method on every rank with the same arguments; :meth:`submit_rows`
    splits row collections over the replicas (:func:`~carft_nemo.distributed.replicas.split_rows`,
    every rank of a replica gets its part); :meth:`answers` keeps each replica's answering
    rank's result. :meth:`independent` builds a group without a process group (the reward
    pool); :class:`RayWorkerGroup` one whose actors form a model-parallel layout.
    ``locations`` holds each rank's node (:func:`~carft_nemo.distributed.placement.where_am_i`),
    which failures name.
    """

    even_rows = False  # model replicas need equal shares (RayWorkerGroup)

    def __init__(self, worker_cls: type, actors: list[Any], replicas: ReplicaMap) -> None:
        self.worker_cls = worker_cls
        self.actors = actors
        self.replicas = replicas
        self.generation_replicas = replicas  # a model group's differ under context parallelism
        self.locations: list[WorkerLocation] = self._placed(worker_cls.__name__)

    def _placed(self, name: str) -> list[WorkerLocation]:
        """Each actor's location, once Ray has placed them all; a clear failure if it cannot.

        An actor whose resources (CPUs, GPUs, a ``carft_node_<i>``) no node can give waits in
        Ray's queue without an error: after :data:`PLACEMENT_TIMEOUT_S` the group is refused,
        naming how many ranks found no place and what the cluster has.
        """
        import ray

        refs = [actor.__ray_call__.remote(where_am_i) for actor in self.actors]
        try:
            _, waiting = ray.wait(refs, num_returns=len(refs), timeout=PLACEMENT_TIMEOUT_S)
            if waiting:
                have = {k: v for k, v in ray.cluster_resources().items() if not k.startswith(("node:", "memory"))}
                self.kill()
                raise WorkerFailure(
                    f"{name} group: {len(waiting)} of {len(refs)} workers were not placed or did not start "
                    f"within {PLACEMENT_TIMEOUT_S:.0f} s (the cluster has {have}); check the role's nodes "
                    "(<role>.nodes), num_workers and the job's CPUs / GPUs per node"
                )
            return ray.get(refs)
        except ray.exceptions.RayError as err:
            self.kill()
            lines = str(err).strip().splitlines()
            raise WorkerFailure(f"{name} group did not start ({lines[-1] if lines else type(err).__name__})") from err

    @classmethod
    def independent(
        cls,
        worker_cls: type,
        num_workers: int,
        *worker_args: Any,
        num_cpus_per_worker: float = 1,
        nodes: Sequence[int] = (),
    ) -> WorkerGroup:
        """``num_workers`` actors with no collective between them, each its own replica, on ``nodes``."""
        import ray

        require(num_workers >= 1, "num_workers", f"must be >= 1, got {num_workers}")
        remote = ray.remote(num_cpus=num_cpus_per_worker, num_gpus=0)(worker_cls)
        actors = [remote.options(**actor_options(node)).remote(*worker_args) for node in rank_nodes(num_workers, nodes)]
        return cls(worker_cls, actors, ReplicaMap.independent(num_workers))

    @property
    def world_size(self) -> int:
        return len(self.actors)

    def submit(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Start ``method(*args, **kwargs)`` on every rank without waiting; futures in rank order."""
        name = method_name(self.worker_cls, method)
        return [getattr(actor, name).remote(*args, **kwargs) for actor in self.actors]

    def submit_rows(self, method: Callable[..., Any], rows: tuple[Rows, ...], *args: Any, **kwargs: Any) -> list[Any]:
        """Start ``method(*row_parts, *args, **kwargs)`` on every rank, each replica with its part of ``rows``.

        ``rows`` is a tuple of row collections of one length (a batch dict; prompts; completions
        and their examples), each split the same way.
        """
        name = method_name(self.worker_cls, method)
        columns = [split_rows(r, self.replicas.data_parallel, even=self.even_rows) for r in rows]
        per_replica = [tuple(col[d] for col in columns) for d in range(self.replicas.data_parallel)]
        return [
            getattr(actor, name).remote(*parts, *args, **kwargs)
            for actor, parts in zip(self.actors, self.replicas.per_rank(per_replica))
        ]

    def generating(self) -> WorkerGroup:
        """This group's actors with generation's replicas (:meth:`ReplicaMap.for_generation`)."""
        view = copy.copy(self)
        view.replicas = self.generation_replicas
        return view

    def answers(self, results: list[Any]) -> list[Any]:
        """Each replica's answer (its answering rank's result), in replica order."""
        return self.replicas.answers(results)

    def run(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """:meth:`submit` and wait; results in rank order."""
        import ray

        return ray.get(self.submit(method, *args, **kwargs))

    def pids(self) -> list[int]:
        """Process ids of the actors, in rank order (logs, fault-injection tests)."""
        import ray

        return ray.get([actor.process_id.remote() for actor in self.actors])

    def kill(self) -> None:
        """Stop the actors without a collective (also after a failure)."""
        import ray

        for actor in getattr(self, "actors", []):
            ray.kill(actor, no_restart=True)
        self.actors = []


class RayWorkerGroup(WorkerGroup):
    """``world_size`` actors of ``worker_cls`` sharing one TP/PP/DP layout.

    ``model_dims`` (``num_layers``, ``num_attention_heads``, ``num_query_groups``) are
    validated against the layout on the driver, before any actor starts. ``nodes``: the
    cluster nodes the ranks fill in order (:func:`~carft_nemo.distributed.placement.rank_nodes`);
    empty, Ray places them.
    """

    even_rows = True

    def __init__(
        self,
        worker_cls: type[ParallelWorker],
        world_size: int,
        parallel: ParallelConfig,
        *,
        seed: int = 1234,
        model_dims: dict[str, int] | None = None,
        num_cpus_per_worker: float = 1,
        num_gpus_per_worker: float | None = None,
        worker_args: Sequence[Any] = (),
        worker_kwargs: dict[str, Any] | None = None,
        nodes: Sequence[int] = (),
    ) -> None:
        import ray

        require(
            issubclass(worker_cls, ParallelWorker),
            "worker_cls",
            f"{worker_cls.__name__} must derive from ParallelWorker",
        )
        require(world_size >= 1, "world_size", f"must be >= 1, got {world_size}")
        validate_layout(parallel, world_size, **(model_dims or {}))
        if not ray.is_initialized():
            raise ConfigError("ray: not initialised; call start_local_ray() or ray.init() first")
        # GPUs of the cluster, not of the driver: the driver may run on a node without one.
        cluster_gpus = ray.cluster_resources().get("GPU", 0) > 0 or device.has_cuda()
        gpus = (1 if cluster_gpus else 0) if num_gpus_per_worker is None else num_gpus_per_worker
        remote_cls = ray.remote(num_cpus=num_cpus_per_worker, num_gpus=gpus)(worker_cls)
        actors = [
            remote_cls.options(**actor_options(node)).remote(*worker_args, **(worker_kwargs or {}))
            for node in rank_nodes(world_size, nodes)
        ]
        super().__init__(worker_cls, actors, ReplicaMap.independent(world_size))
        self.layouts = self._form_process_group(parallel, seed, model_dims)
        self.replicas = ReplicaMap.from_layouts(self.layouts)
        self.generation_replicas = ReplicaMap.for_generation(self.layouts)

    def _form_process_group(
        self, parallel: ParallelConfig, seed: int, model_dims: dict[str, int] | None
    ) -> list[ParallelLayout]:
        """Rank 0 picks the rendezvous; every actor joins it at once (``init_process_group`` blocks)."""
        import ray
        from ray.exceptions import RayError

        try:
            host, port = ray.get(self.actors[0].rendezvous_address.remote())
            return ray.get(
                [
                    actor.init_parallel.remote(
                        parallel, ProcessInfo(rank, self.world_size, 0, host, port), seed, model_dims
                    )
                    for rank, actor in enumerate(self.actors)
                ]
            )
        except RayError as err:
            self.kill()
            lines = str(err).strip().splitlines()
            raise WorkerFailure(
                f"{self.worker_cls.__name__} group could not form its process group "
                f"({lines[-1] if lines else type(err).__name__}); rerun the command"
            ) from err
        except BaseException:
            self.kill()
            raise

    def shutdown(self) -> None:
        """Tear down the process group on every rank, then stop the actors."""
        import ray

        try:
            ray.get([actor.shutdown_parallel.remote() for actor in self.actors])
        finally:
            self.kill()


class WorkerFailure(RuntimeError):
    """A worker of a named role died, raised, or did not answer in time."""


def lost_node_message(locations: Mapping[str, Sequence[WorkerLocation]]) -> str:
    """ "node N at A is lost (...): <role> rank R, ... ran there" for the first lost node of a run, or ""."""
    by_node: dict[str, list[tuple[str, int, WorkerLocation]]] = {}
    for role, ranks in locations.items():
        for rank, location in enumerate(ranks):
            by_node.setdefault(location.node_id, []).append((role, rank, location))
    gone = unreachable_nodes(by_node)  # one probe of every node
    lost = [node for node in by_node if node in gone]
    if not lost:
        return ""
    workers = by_node[lost[0]]
    ran = ", ".join(f"{role} rank {rank}" for role, rank, _ in workers)
    return f"node {workers[0][2]} is lost (its Ray does not answer): {ran} ran there"


def wait_all(
    calls: Mapping[str, Sequence[Any]],
    timeout_s: float,
    *,
    poll_s: float = 0.1,
    finished_at: dict[str, float] | None = None,
    roles: Mapping[str, str] | None = None,
    locations: Mapping[str, Sequence[WorkerLocation]] | None = None,
) -> dict[str, list[Any]]:
    """Results of several pending calls (``{name: [future per rank]}``), in rank order.

    Why not ``ray.get(all)``: it waits in list order, so with a dead critic rank and its
    peers blocked in a collective it could wait forever. Here every finished future is
    fetched as soon as it is ready, so the first failure surfaces within ``poll_s`` of Ray
    noticing it, and :class:`WorkerFailure` names the role and rank. A call still pending
    after ``timeout_s`` is a failure too. ``finished_at`` (optional) receives each call's
    completion time (``time.perf_counter()``, within ``poll_s``), for per-phase timings.
    ``roles`` names the role that answers each call in error messages (default: the call's
    name), e.g. ``{"reference_logprobs": "actor"}`` when the actor computes them;
    ``locations`` every role's node per rank (:attr:`WorkerGroup.locations`), named too.

    A worker that raised or died may only be the first to notice that a node went away (gloo:
    "Connection closed by peer" on a peer of the lost ranks): then the run's nodes are probed
    (:func:`~carft_nemo.distributed.placement.unreachable_nodes`) and a lost node, with the roles
    that ran there, is named as the cause.
    """
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError

    where = {ref: (role, rank) for role, refs in calls.items() for rank, ref in enumerate(refs)}
    results: dict[str, list[Any]] = {role: [None] * len(refs) for role, refs in calls.items()}
    pending = list(where)
    left_per_role = {role: len(refs) for role, refs in calls.items()}
    deadline = time.monotonic() + timeout_s

    def worker(call: str, rank: int) -> str:
        role = (roles or {}).get(call, call)
        nodes = (locations or {}).get(role, ())
        return f"{role} worker (rank {rank}{f' on {nodes[rank]}' if rank < len(nodes) else ''})"

    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            raise WorkerFailure(
                f"{worker(*where[pending[0]])} did not answer within {timeout_s:.0f} s "
                f"(rl.call_timeout_s); stopping the run"
            )
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=min(poll_s, left))
        for ref in ready:
            role, rank = where[ref]
            try:
                results[role][rank] = ray.get(ref, timeout=poll_s)
            except (RayError, GetTimeoutError) as err:
                first = str(err).strip().splitlines()
                reason = first[-1] if first else type(err).__name__
                failure = f"{worker(role, rank)} failed: {type(err).__name__}: {reason}"
                if isinstance(err, (RayTaskError, RayActorError)) and locations:
                    lost = lost_node_message(locations)
                    if lost:
                        raise WorkerFailure(f"{lost}; the first failure seen: {failure}") from err
                raise WorkerFailure(failure) from err
            left_per_role[role] -= 1
            if finished_at is not None and left_per_role[role] == 0:
                finished_at[role] = time.perf_counter()
    return results


__all__ = [
    "ParallelWorker",
    "RayWorkerGroup",
    "WorkerFailure",
    "WorkerGroup",
    "method_name",
    "shared_ray",
    "start_local_ray",
    "wait_all",
]
