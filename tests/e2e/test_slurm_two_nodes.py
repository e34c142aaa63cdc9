"""Slurm + Ray on two nodes, for real: two network namespaces on this host (``_slurm_cluster``).

``node1`` and ``node2`` each run a slurmd in a namespace of their own, joined by a veth pair
with link-local addresses; everything between them (Slurm, Ray, gloo) crosses that link.

* ``sbatch --nodes=2 slurm/rl.sbatch``: a tiny CARFT with the Ray head on node1 and a Ray
  worker on node2; the actor's two pipeline stages on different nodes (``actor.nodes=[0,1]``),
  the critic on node2. It checkpoints, takes the preemption signal, requeues and resumes.
* ``sbatch --nodes=2 slurm/run.sbatch``: an SFT with PP=2, one stage per node.
* Node failure: node2's Ray and the job step that runs it are killed mid-run. The run ends
  within 60 s with one error naming node2 and the roles that ran there; the same command
  resumes from the newest checkpoint; nothing is left on either node.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e._rl_helpers import RESUMED, ROOT, TINY_RL_ARGS, checkpoint_steps, metrics
from tests.e2e._slurm_cluster import CLUSTER_DAEMONS, LINK_LOCAL_PREFIX, LoopbackSlurm, require_slurm
from tests.e2e._slurm_jobs import (
    FINAL_STATES,
    JOB_TIMEOUT_S,
    assert_no_leftovers,
    assert_rl_resumed_to_the_end,
    finished_job,
    job_fields,
    micro_sft_overrides,
    preempt_and_requeue,
    submit,
    wait_for,
)

NODE1, NODE2 = f"node1 at {LINK_LOCAL_PREFIX}1", f"node2 at {LINK_LOCAL_PREFIX}2"
# Node 0 holds the Ray head, the controller, actor stage 0 and the reward worker; node 1 actor
# stage 1 and the critic: two Ray CPUs a node, as --cpus-per-task=2 gives each.
PLACEMENT = [
    "actor.num_workers=2",
    "actor.parallel.pipeline_parallel=2",
    "actor.nodes=[0,1]",
    "critic.nodes=[1]",
    "reward.nodes=[0]",
]
WORKERS_UP = re.compile(r"workers up in [\d.]+ s: (.*)")
KILL_TO_END_LIMIT_S = 60.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[LoopbackSlurm]:
    require_slurm()
    slurm = LoopbackSlurm(nodes=2)
    try:
        yield slurm.start()
    finally:
        slurm.stop()
    assert not slurm.remains(), slurm.remains()  # no namespace, daemon or folder of the cluster left


def _rl_job(sft_dir: Path, out: Path, steps: int) -> list[str]:
    overrides = [f"sft_checkpoint={sft_dir}", f"output_dir={out}", *TINY_RL_ARGS, *PLACEMENT, f"rl.steps={steps}"]
    return ["--cpus-per-task=2", str(ROOT / "slurm" / "rl.sbatch"), "configs/carft-tiny-synthetic.yaml", *overrides]


def _assert_placed(text: str) -> None:
    """Each run of the job logged its workers' nodes: the actor's stages on both, the critic on node2."""
    placements = WORKERS_UP.findall(text)
    assert placements, text[-4000:]
    for placed in placements:
        assert f"actor x2 on {NODE1}, {NODE2}" in placed, placed
        assert f"critic x1 on {NODE2}" in placed and f"reward x1 on {NODE1}" in placed, placed


@pytest.mark.slow
def test_rl_sbatch_two_nodes_pipeline_across_nodes_requeue_resume(
    cluster: LoopbackSlurm, sft_dir: Path, tmp_path: Path
) -> None:
    steps, out, log = 6, tmp_path / "rl", tmp_path / "job.out"
    text = preempt_and_requeue(
        cluster,
        _rl_job(sft_dir, out, steps),
        lambda: bool(checkpoint_steps(out, "actor")) and bool(checkpoint_steps(out, "critic")),
        ["--batch"],
        log,
    )

    assert "2 node(s) x 0 GPUs, ray head node1" in text, text[-4000:]
    assert "2 of 2 nodes" in text, text[-4000:]  # the controller waited for node2's Ray
    assert len(WORKERS_UP.findall(text)) == 2, text[-4000:]  # one line per run of the job
    _assert_placed(text)
    assert_rl_resumed_to_the_end(text, out, steps)


@pytest.mark.slow
def test_run_sbatch_sft_pipeline_stages_on_two_nodes(cluster: LoopbackSlurm, tmp_path: Path) -> None:
    steps, out, log = 4, tmp_path / "sft", tmp_path / "job.out"
    overrides = [*micro_sft_overrides(out, steps), "parallel.pipeline_parallel=2"]  # two layers: one a stage
    job = [
        "--ntasks-per-node=1",  # rank 0 (stage 0) on node1, rank 1 (stage 1) on node2
        "--cpus-per-task=1",
        str(ROOT / "slurm" / "run.sbatch"),
        "recipes/sft.py",
        "configs/sft-tiny-synthetic.yaml",
        *overrides,
    ]
    job_id = submit(cluster, job, log)
    fields = wait_for("finished SFT job", lambda: finished_job(cluster, job_id), JOB_TIMEOUT_S, log, cluster)
    text = log.read_text()
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", (fields, text[-4000:])
    # The rendezvous is node1 at the address Slurm reaches it by (no DNS for node names here).
    assert f"2 tasks, master {LINK_LOCAL_PREFIX}1:" in text, text[-4000:]
    assert fields["NodeList"] == "node[1-2]", fields
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == steps and not summary["stopped_early"], summary
    assert [int(r["step"]) for r in metrics(out) if "loss" in r] == list(range(1, steps + 1))
    assert_no_leftovers(cluster)


@pytest.mark.slow
def test_rl_node_failure_names_the_node_and_the_rerun_resumes(
    cluster: LoopbackSlurm, sft_dir: Path, tmp_path: Path
) -> None:
    steps, out, log = 8, tmp_path / "rl", tmp_path / "job.out"
    job_id = submit(cluster, _rl_job(sft_dir, out, steps), log)

    def two_steps_saved() -> bool:
        if job_fields(cluster, job_id).get("JobState") in FINAL_STATES:
            pytest.fail(f"job {job_id} ended before the test could take node2 down:\n{log.read_text()[-4000:]}")
        return len(set(checkpoint_steps(out, "actor")) & set(checkpoint_steps(out, "critic"))) >= 2

    wait_for("two checkpointed steps", two_steps_saved, JOB_TIMEOUT_S, log, cluster)
    # node2 goes down: its Ray (`ray start`, raylet, the actor's stage 1, the critic) and the job
    # step running it; Slurm's own daemons stay, as the step's slurmstepd reports the loss.
    doomed = cluster.job_processes(1, keep=CLUSTER_DAEMONS | {"slurmstepd"})
    assert any("ray start" in line for line in doomed.values()), doomed
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    killed_at = time.monotonic()

    limit_s = KILL_TO_END_LIMIT_S + 30
    fields = wait_for("the end of the job", lambda: finished_job(cluster, job_id), limit_s, log, cluster)
    kill_to_end = time.monotonic() - killed_at
    text = log.read_text()
    print(f"\nnode2 down -> job {fields['JobState']}: {kill_to_end:.1f} s (limit {KILL_TO_END_LIMIT_S:.0f} s)")
    assert kill_to_end < KILL_TO_END_LIMIT_S, text[-4000:]
    assert fields["JobState"] == "FAILED" and int(fields.get("Restarts", "0")) == 0, (fields, text[-4000:])
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"error: node {NODE2} is lost (its Ray does not answer): ") and "critic" in errors[0]
    assert "Traceback" not in text, text[-4000:]
    assert_no_leftovers(cluster)

    # The same command resumes from the newest step both roles saved, and finishes.
    newest = max(set(checkpoint_steps(out, "actor")) & set(checkpoint_steps(out, "critic")))
    rerun_log = tmp_path / "rerun.out"
    rerun = submit(cluster, _rl_job(sft_dir, out, steps), rerun_log)
    fields = wait_for("the rerun's end", lambda: finished_job(cluster, rerun), JOB_TIMEOUT_S, rerun_log, cluster)
    text = rerun_log.read_text()
    assert fields["JobState"] == "COMPLETED", (fields, text[-4000:])
    assert [int(s) for s in RESUMED.findall(text)] == [newest], text[-4000:]
    _assert_placed(text)
    assert json.loads((out / "summary.json").read_text())["steps"] == steps
    assert_no_leftovers(cluster)
