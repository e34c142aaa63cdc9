"""slurm/rl.sbatch under a real Slurm: preemption signal -> checkpoint -> requeue -> resume.

A one-node Slurm cluster runs in a private network namespace (``_slurm_cluster``). The job is
the tiny ReFT recipe at test size; its Ray head is started by the script through ``srun``, as
on a cluster. Once step 1 is checkpointed the test sends SIGUSR1 to the batch shell, as
``--signal=B:USR1@300`` does before the time limit. The script must forward it to the
controller, which saves and exits with ``stopped_early``; the script stops Ray and requeues
the job; the requeued job resumes from the saved step and finishes; the log keeps both runs;
and nothing of the job outlives it.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.e2e._rl_helpers import ROOT, TINY_RL_ARGS, checkpoint_complete, metrics, training_steps
from tests.e2e._slurm_cluster import LoopbackSlurm, require_slurm

STEPS = 6
JOB_TIMEOUT_S = 600.0
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[LoopbackSlurm]:
    require_slurm()
    slurm = LoopbackSlurm()
    try:
        yield slurm.start()
    finally:
        slurm.stop()


def _job(cluster: LoopbackSlurm, job_id: str) -> dict[str, str]:
    """``scontrol show job`` as key -> value (JobState, Restarts, ExitCode...)."""
    out = cluster.run(["scontrol", "show", "job", "-o", job_id], check=False).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def _fail(why: str, log: Path, cluster: LoopbackSlurm) -> None:
    text = log.read_text()[-4000:] if log.is_file() else "(no job log)"
    pytest.fail(f"{why}\n--- job log\n{text}\n{cluster.logs()}")


def _wait(what: str, ready: Callable[[], Any], timeout_s: float, log: Path, cluster: LoopbackSlurm) -> Any:
    """Poll ``ready`` until it returns something truthy, which is returned."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = ready()
        if got:
            return got
        time.sleep(0.5)
    _fail(f"no {what} within {timeout_s:.0f} s", log, cluster)


@pytest.mark.slow
def test_signal_checkpoint_requeue_resume(cluster: LoopbackSlurm, sft_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "rl"
    log = tmp_path / "job.out"
    # The value head shares the policy (critic.layout=shared): actor + reward worker fit 2 CPUs.
    overrides = [f"sft_checkpoint={sft_dir}", f"output_dir={out}", *TINY_RL_ARGS, "critic.layout=shared",
                 f"rl.steps={STEPS}"]
    env = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CARFT_PYTHON": sys.executable,
           "RAY_AUTH_MODE": "token"}  # the script's own default: a fresh token for the job's Ray
    submit = cluster.run(["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2",
                          "--mem=3000", "--time=20", f"--output={log}", str(ROOT / "slurm" / "rl.sbatch"),
                          "configs/reft-tiny-synthetic.yaml", *overrides], cwd=ROOT, env=env)
    job_id = submit.stdout.strip().split(";")[0]

    def step_one_saved() -> bool:
        if _job(cluster, job_id).get("JobState") in FINAL_STATES:
            _fail(f"job {job_id} ended before its step-1 checkpoint: {_job(cluster, job_id)}", log, cluster)
        return checkpoint_complete(out, "actor", 1)

    _wait("step-1 checkpoint", step_one_saved, JOB_TIMEOUT_S, log, cluster)
    assert _job(cluster, job_id).get("JobState") == "RUNNING", _job(cluster, job_id)
    cluster.run(["scancel", "--batch", "--signal=USR1", job_id])

    def finished() -> dict[str, str] | None:
        job = _job(cluster, job_id)
        return job if job.get("JobState") in FINAL_STATES and int(job.get("Restarts", "0")) >= 1 else None

    job = _wait("requeued run that finished", finished, JOB_TIMEOUT_S, log, cluster)
    text = log.read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", (job, text[-4000:])
    assert int(job["Restarts"]) == 1, job

    # The log keeps both runs (--open-mode=append): the signal, the requeue, the resume.
    assert f"job {job_id} restart 0" in text and f"job {job_id} restart 1" in text, text[-4000:]
    stopped = re.findall(r"stop signal \S+: saving at step (\d+) and exiting", text)
    assert len(stopped) == 1, text[-4000:]
    assert f"stopped early on a signal: requeueing {job_id}" in text, text[-4000:]
    resumed = [int(s) for s in re.findall(r"resumed from \S+ \(step (\d+)\)", text)]
    assert resumed == [int(stopped[0])] and 1 <= resumed[0] < STEPS, (resumed, stopped)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS and not summary["stopped_early"], summary
    steps = training_steps(metrics(out))
    assert steps == list(range(1, STEPS + 1)), steps  # each step trained once, none lost to the requeue

    # srun stopped the Ray head's step; nothing but the cluster's own daemons is left.
    deadline = time.monotonic() + 30
    while (leftovers := cluster.job_leftovers()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not leftovers, leftovers
