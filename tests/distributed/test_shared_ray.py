"""One Ray instance kept up across the runs of a pipeline (``shared_ray``).

Runs inside it join the instance (``start_local_ray`` reports they do not own it, so their
``stop_workers`` leaves it up for the next run); it is stopped when the block ends, and a
block with no run left to make starts nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

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


def test_local_start_ignores_a_head_recorded_by_ray_start(monkeypatch) -> None:
    """``ray start`` records its head in <ray temp dir>/ray_current_cluster and a head stopped by a
    signal (a Slurm job's end) leaves the file behind; a bare ray.init() would try to join it."""
    assert not ray.is_initialized(), "another test left Ray running"
    temp = Path(tempfile.mkdtemp(prefix="rt"))  # short: Ray's socket paths live under it
    monkeypatch.setenv("RAY_TMPDIR", str(temp))
    (temp / "ray").mkdir()
    (temp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9")  # no Ray head there
    try:
        assert start_local_ray(num_cpus=1) is True  # started, and owned, by this call
        assert ray.cluster_resources().get("CPU") == 1.0
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
