"""``<role>.nodes`` on a real two-raylet Ray cluster (one host): ranks land on the
nodes asked for, a removed node is found within the probe's timeout, and a failure while a
peer's node is gone is reported as that node's loss, naming the roles that ran there.

The full two-host version (Slurm, network namespaces, gloo over a veth) is
tests/e2e/test_slurm_two_nodes.py; this one takes seconds.
"""

from __future__ import annotations

import os
import time

import pytest

from carft_nemo.distributed import ray_group
from carft_nemo.distributed.placement import NODE_RESOURCE_TOTAL, node_resource
from carft_nemo.distributed.ray_group import WorkerFailure, WorkerGroup, lost_node_message, share_sys_path, wait_all

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")


class Probe:
    """A worker that says which process it is, waits, or fails as its peer's loss would make it."""

    def pid(self) -> int:
        return os.getpid()

    def wait(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    def fail(self) -> None:
        raise RuntimeError("Connection closed by peer")


@pytest.fixture
def two_nodes(monkeypatch: pytest.MonkeyPatch):
    """A head (node 0, 1 CPU) and a second raylet (node 1, 2 CPUs) on this host's address."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # restored after share_sys_path
    share_sys_path()  # the raylets' workers import this module
    assert not ray.is_initialized()
    cluster = cluster_utils.Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={
            "num_cpus": 1,
            "resources": {node_resource(0): NODE_RESOURCE_TOTAL},
            "include_dashboard": False,
        },
    )
    second = cluster.add_node(num_cpus=2, resources={node_resource(1): NODE_RESOURCE_TOTAL})
    ray.init(address=cluster.address)
    try:
        yield cluster, second
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_ranks_land_on_their_nodes_and_a_lost_node_is_named(two_nodes, monkeypatch: pytest.MonkeyPatch) -> None:
    cluster, second = two_nodes
    # A rank no node can take (node 5 does not exist; the controller's own check comes earlier) waits
    # in Ray's queue without an error: the group gives up after PLACEMENT_TIMEOUT_S, saying why.
    with monkeypatch.context() as patch, pytest.raises(WorkerFailure) as unplaced:
        patch.setattr(ray_group, "PLACEMENT_TIMEOUT_S", 2.0)
        WorkerGroup.independent(Probe, 1, nodes=[5])
    assert str(unplaced.value).startswith("Probe group: 1 of 1 workers were not placed or did not start within 2 s")
    assert "'carft_node_1': 10000.0" in str(unplaced.value)  # what the cluster has

    head_id = next(n["NodeID"] for n in ray.nodes() if n["NodeID"] != second.node_id)
    # One rank per node, listed in reverse: rank 0 on node 1, rank 1 on node 0 (the head).
    group = WorkerGroup.independent(Probe, 2, nodes=[1, 0])
    assert [loc.node_id for loc in group.locations] == [second.node_id, head_id]
    assert group.locations[0].address == group.locations[1].address == second.node_ip_address
    helper = WorkerGroup.independent(Probe, 1, nodes=[0], num_cpus_per_worker=0)
    locations = {"critic": group.locations[:1], "actor": group.locations[1:] + helper.locations}
    assert lost_node_message(locations) == ""  # both raylets answer

    cluster.remove_node(second)
    started = time.monotonic()
    message = lost_node_message(locations)
    assert time.monotonic() - started < 10
    assert message.startswith(f"node {group.locations[0]} is lost") and message.endswith("critic rank 0 ran there")

    # The surviving actor rank fails first (as gloo does when a peer vanishes) while its other rank still
    # works: the run's error names the lost node and keeps the first failure seen.
    calls = {"actor": [group.actors[1].fail.remote(), helper.actors[0].wait.remote(5.0)]}
    with pytest.raises(WorkerFailure) as failure:
        wait_all(calls, timeout_s=30, locations=locations)
    text = str(failure.value)
    assert text.startswith(f"node {group.locations[0]} is lost (its Ray does not answer): critic rank 0 ran there")
    assert "the first failure seen: actor worker (rank 0 on" in text and "Connection closed by peer" in text
    group.kill()
    helper.kill()
