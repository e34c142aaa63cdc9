"""Placing a role's ranks on cluster nodes (``<role>.nodes``): the rank -> node map, the checks at
configuration time and against the Ray cluster, and the interface gloo binds towards the master."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from carft_nemo.config import ConfigError, load_config
from carft_nemo.distributed.device import configure_transport, interface_towards
from carft_nemo.distributed.placement import (
    WorkerLocation,
    actor_options,
    check_cluster_has,
    cluster_nodes,
    rank_nodes,
)
from carft_nemo.models.config import ModelConfig
from carft_nemo.rl.config import RLConfig
from carft_nemo.rl.controller import check_layouts

TINY_CARFT = Path(__file__).resolve().parents[3] / "configs" / "carft-tiny-synthetic.yaml"


def test_ranks_fill_the_listed_nodes_in_order() -> None:
    assert rank_nodes(4, [1, 2]) == [1, 1, 2, 2]
    assert rank_nodes(6, [2, 0, 1]) == [2, 2, 0, 0, 1, 1]  # the list's order, not the numbers'
    assert rank_nodes(3, []) == [None, None, None]  # Ray's choice
    with pytest.raises(ConfigError, match=r"nodes: num_workers=3 ranks do not split evenly over 2 nodes"):
        rank_nodes(3, [0, 1])  # a group started without a config is checked too


def test_a_pinned_rank_asks_for_its_nodes_resource_only() -> None:
    assert actor_options(3) == {"resources": {"carft_node_3": 1.0}}
    assert actor_options(None) == {}


def test_cluster_nodes_are_read_from_the_resources_ray_reports() -> None:
    resources = {"CPU": 4.0, "carft_node_1": 10000.0, "carft_node_0": 10000.0, "carft_node_x": 1.0, "memory": 1e9}
    assert cluster_nodes(resources) == [0, 1]


def test_a_role_on_a_node_the_cluster_lacks_is_refused_by_key() -> None:
    resources = {"carft_node_0": 10000.0}
    check_cluster_has("actor.nodes", [0], resources)
    with pytest.raises(ConfigError, match=r"^critic\.nodes: the Ray cluster has no node 1, 2 \(it has nodes \[0\]"):
        check_cluster_has("critic.nodes", [0, 1, 2], resources)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["actor.nodes=[0,0]"], r"actor\.nodes: lists a node twice"),
        (["actor.nodes=[-1]"], r"actor\.nodes: node numbers start at 0"),
        (["actor.num_workers=3", "actor.nodes=[0,1]"], r"actor\.nodes: num_workers=3 ranks do not split evenly"),
        (["reward.num_workers=1", "reward.nodes=[0,1]"], r"reward\.nodes: num_workers=1 ranks"),
        (["critic.layout=shared", "critic.nodes=[1]"], r"critic\.nodes: places the separate critic's ranks"),
        (["reference.nodes=[1]"], r"reference\.nodes: places the reference group's ranks; with mode: swap"),
    ],
)
def test_bad_node_lists_fail_at_load_naming_the_full_key(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(RLConfig, TINY_CARFT, overrides)


def test_a_tensor_parallel_group_may_not_straddle_two_nodes() -> None:
    model = ModelConfig(preset="tiny")
    fits = load_config(
        RLConfig,
        TINY_CARFT,
        ["actor.num_workers=4", "actor.parallel.tensor_parallel=2", "actor.nodes=[0,1]", "actor.micro_batch_size=4"],
    )
    assert check_layouts(fits, model)["actor"] == 2
    split = load_config(
        RLConfig,
        TINY_CARFT,
        ["actor.num_workers=2", "actor.parallel.tensor_parallel=2", "actor.nodes=[0,1]", "actor.micro_batch_size=8"],
    )
    with pytest.raises(ConfigError, match=r"actor\.nodes: 1 ranks per node must be a multiple of tensor x context"):
        check_layouts(split, model)


def test_a_location_reads_as_node_and_address() -> None:
    assert str(WorkerLocation("node2", "169.254.88.2", "ab12")) == "node2 at 169.254.88.2"
    assert str(WorkerLocation("127.0.0.1", "127.0.0.1", "")) == "127.0.0.1"


def test_gloo_binds_the_interface_that_routes_to_the_master(monkeypatch: pytest.MonkeyPatch) -> None:
    assert interface_towards("127.0.0.1") == "lo"
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    configure_transport("127.0.0.2")  # not one of the loopback names, yet routed through lo
    assert os.environ["GLOO_SOCKET_IFNAME"] == "lo"
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth7")
    configure_transport("127.0.0.2")
    assert os.environ["GLOO_SOCKET_IFNAME"] == "eth7"  # the user's choice stands
