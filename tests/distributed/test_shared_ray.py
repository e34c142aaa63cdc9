"""One Ray instance kept up across the runs of a pipeline (``shared_ray``).

Runs inside it join the instance (``start_local_ray`` reports they do not own it, so their
``stop_workers`` leaves it up for the next run); it is stopped when the block ends, and a
block with no run left to make starts nothing.
"""

from __future__ import annotations

import os

import pytest

from carft_nemo.distributed.ray_group import shared_ray, start_local_ray

ray = pytest.importorskip("ray")


@ray.remote(num_cpus=1)
class _Probe:
    def pid(self) -> int:
        return os.getpid()


def test_runs_inside_join_the_instance_and_it_stops_at_the_end() -> None:
    assert not ray.is_initialized(), "another test left Ray running"
    with shared_ray(2):
        node = ray.get_runtime_context().get_node_id()
        pids = []
        for _ in range(2):  # two "runs" one after another, each with its own actors
            assert start_local_ray(num_cpus=2) is False  # joined, not owned: the run must not stop it
            actors = [_Probe.remote() for _ in range(2)]  # both CPUs: the first run's must have been freed
            pids += ray.get([a.pid.remote() for a in actors])
            for actor in actors:
                ray.kill(actor, no_restart=True)
        assert ray.get_runtime_context().get_node_id() == node
    assert not ray.is_initialized()
    assert len(set(pids)) == 4 and os.getpid() not in pids


def test_nothing_left_to_run_starts_nothing() -> None:
    with shared_ray(0):
        assert not ray.is_initialized()

