"""Which node of the cluster each rank of a role runs on (``<role>.nodes``), and where it ended up.

Nodes are numbered in the allocation's order: ``slurm/rl.sbatch`` gives node i of the job
(Slurm's node list; the batch node, which holds the Ray head and the controller, is 0) the
Ray resource ``carft_node_<i>``, and a Ray instance started on one host gives itself
``carft_node_0``. A role with ``nodes: [1, 2]`` and 16 ranks asks each rank for a sliver of
one node's resource: ranks 0-7 on node 1, ranks 8-15 on node 2. Consecutive ranks share a
node, and megatron puts tensor (then context) parallelism on the innermost ranks, so a
TP group never straddles two nodes when ranks per node divide by it; pipeline stages, the
outermost model axis, are the ones that cross. An empty list leaves the choice to Ray.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from carft_nemo.config import ConfigError, require

NODE_RESOURCE_PREFIX = "carft_node_"
NODE_RESOURCE_TOTAL = 10_000.0  # what each node offers; a rank asks for one unit
RANK_SHARE = 1.0


def node_resource(node: int) -> str:
    """The Ray resource that only node ``node`` of the cluster has."""
    return f"{NODE_RESOURCE_PREFIX}{node}"


def check_role_nodes(nodes: Sequence[int], num_workers: int) -> None:
    """Config-time checks of a role's ``nodes`` (keys relative to the role's section)."""
    require(all(n >= 0 for n in nodes), "nodes", f"node numbers start at 0, got {list(nodes)}")
    require(len(set(nodes)) == len(nodes), "nodes", f"lists a node twice: {list(nodes)}")
    require(
        not nodes or num_workers % len(nodes) == 0,
        "nodes",
        f"num_workers={num_workers} ranks do not split evenly over {len(nodes)} nodes {list(nodes)}",
    )


def rank_nodes(world_size: int, nodes: Sequence[int]) -> list[int | None]:
    """The node of each rank: ``nodes`` filled in order, ``world_size / len(nodes)`` ranks each."""
    check_role_nodes(nodes, world_size)  # groups started without a config come here unchecked
    if not nodes:
        return [None] * world_size
    per_node = world_size // len(nodes)
    return [nodes[rank // per_node] for rank in range(world_size)]


def cluster_nodes(resources: Mapping[str, float]) -> list[int]:
    """The node numbers a Ray cluster offers (from ``ray.cluster_resources()``)."""
    found = [key[len(NODE_RESOURCE_PREFIX) :] for key in resources if key.startswith(NODE_RESOURCE_PREFIX)]
    return sorted(int(n) for n in found if n.isdigit())


def check_cluster_has(key: str, nodes: Sequence[int], resources: Mapping[str, float]) -> None:
    """Refuse, naming ``key``, a role placed on nodes the Ray cluster does not have."""
    have = cluster_nodes(resources)
    missing = sorted(set(nodes) - set(have))
    if missing:
        raise ConfigError(
            f"{key}: the Ray cluster has no node {', '.join(map(str, missing))} (it has nodes {have}; "
            f"slurm/rl.sbatch numbers the job's nodes 0..N-1 with the Ray resource {NODE_RESOURCE_PREFIX}<i>)"
        )


def actor_options(node: int | None) -> dict[str, Any]:
    """``.options(...)`` pinning a Ray actor to ``node`` (none: Ray chooses)."""
    return {} if node is None else {"resources": {node_resource(node): RANK_SHARE}}


def node_address() -> str:
    """This Ray node's address (the one its raylet registered); 127.0.0.1 outside Ray."""
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


@dataclass(frozen=True)
class WorkerLocation:
    """Where a worker runs: Slurm's node name (else the host name), Ray's address and node id."""

    node_name: str
    address: str
    node_id: str

    def __str__(self) -> str:
        return f"{self.node_name} at {self.address}" if self.address != self.node_name else self.node_name


def where_am_i(_actor: Any = None) -> WorkerLocation:
    """This process's :class:`WorkerLocation`.

    Runs inside any Ray actor through ``actor.__ray_call__`` (the argument is the actor's
    instance, unused); Ray's processes on a Slurm node inherit ``SLURMD_NODENAME`` from the
    ``srun`` step that started the node.
    """
    import ray

    name = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    return WorkerLocation(name, node_address(), node_id)


def unreachable_nodes(node_ids: Iterable[str], timeout_s: float = 2.0) -> set[str]:
    """The Ray nodes among ``node_ids`` that are gone: dead in Ray's table, or their raylet refuses TCP.

    Ray's own verdict on a lost node waits for missed health checks (15 s and more); a worker
    whose peer vanished raises at once (gloo: "Connection closed by peer"). Asking each node's
    raylet directly tells, within ``timeout_s``, which node the failure started on.
    """
    import ray

    table = {node["NodeID"]: node for node in ray.nodes()}
    gone = set()
    for node_id in set(node_ids):
        node = table.get(node_id)
        if node is None or not node["Alive"]:
            gone.add(node_id)
            continue
        try:
            socket.create_connection((node["NodeManagerAddress"], node["NodeManagerPort"]), timeout=timeout_s).close()
        except OSError:
            gone.add(node_id)
    return gone


__all__ = [
    "NODE_RESOURCE_PREFIX",
    "NODE_RESOURCE_TOTAL",
    "WorkerLocation",
    "actor_options",
    "check_cluster_has",
    "check_role_nodes",
    "cluster_nodes",
    "node_address",
    "node_resource",
    "rank_nodes",
    "unreachable_nodes",
    "where_am_i",
]
