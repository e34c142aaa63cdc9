"""Submitting to the test clusters of ``_slurm_cluster`` and watching the jobs: states, waits, requeues."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from ray._common.utils import get_ray_address_file

from tests.e2e._rl_helpers import RESUMED, ROOT, metrics, training_steps
from tests.e2e._slurm_cluster import LoopbackSlurm

JOB_TIMEOUT_S = 600.0
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}
STOPPED = re.compile(r"stop signal \S+: saving at step (\d+) and exiting")


def job_fields(cluster: LoopbackSlurm, job_id: str) -> dict[str, str]:
    """``scontrol show job`` as key -> value (JobState, Restarts, ExitCode...)."""
    out = cluster.run(["scontrol", "show", "job", "-o", job_id], check=False).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def finished_job(cluster: LoopbackSlurm, job_id: str) -> dict[str, str] | None:
    """The job's fields once it is in a final state, else None (a :func:`wait_for` condition)."""
    fields = job_fields(cluster, job_id)
    return fields if fields.get("JobState") in FINAL_STATES else None


def fail_with_logs(why: str, log: Path, cluster: LoopbackSlurm) -> None:
    text = log.read_text()[-4000:] if log.is_file() else "(no job log)"
    pytest.fail(f"{why}\n--- job log\n{text}\n{cluster.logs()}")


def wait_for(what: str, ready: Callable[[], Any], timeout_s: float, log: Path, cluster: LoopbackSlurm) -> Any:
    """Poll ``ready`` until it returns something truthy, which is returned."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = ready()
        if got:
            return got
        time.sleep(0.5)
    fail_with_logs(f"no {what} within {timeout_s:.0f} s", log, cluster)


def submit(cluster: LoopbackSlurm, sbatch_args: list[str], log: Path) -> str:
    """``sbatch`` on every node of ``cluster``, CPU only, the log at ``log``; returns the job id."""
    env = {
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "CARFT_PYTHON": sys.executable,
        "RAY_AUTH_MODE": "token",
    }  # rl.sbatch's own default: a fresh token for the job's Ray
    done = cluster.run(
        [
            "sbatch",
            "--parsable",
            f"--nodes={len(cluster.node_names)}",
            "--gpus-per-node=0",
            "--mem=3000",
            "--time=20",
            f"--output={log}",
            *sbatch_args,
        ],
        cwd=ROOT,
        env=env,
    )
    return done.stdout.strip().split(";")[0]


def preempt_and_requeue(
    cluster: LoopbackSlurm, sbatch_args: list[str], progressed: Callable[[], bool], scancel_args: list[str], log: Path
) -> str:
    """Submit; once ``progressed()``, signal the job; wait for its requeued run to finish.

    Returns the job's log, after checking that the job completed with exit 0 after
    exactly one requeue and that none of its processes is left.
    """
    job_id = submit(cluster, sbatch_args, log)

    def ready_to_signal() -> bool:
        state = job_fields(cluster, job_id).get("JobState")
        if state in FINAL_STATES:
            fail_with_logs(f"job {job_id} ended ({state}) before the test could signal it", log, cluster)
        return state == "RUNNING" and progressed()

    wait_for("progress to interrupt", ready_to_signal, JOB_TIMEOUT_S, log, cluster)
    cluster.run(["scancel", *scancel_args, "--signal=USR1", job_id])

    def finished() -> dict[str, str] | None:
        job = job_fields(cluster, job_id)
        return job if job.get("JobState") in FINAL_STATES and int(job.get("Restarts", "0")) >= 1 else None

    job = wait_for("requeued run that finished", finished, JOB_TIMEOUT_S, log, cluster)
    text = log.read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", (job, text[-4000:])
    assert int(job["Restarts"]) == 1, job
    # The log keeps both runs (--open-mode=append).
    assert f"job {job_id} restart 0" in text and f"job {job_id} restart 1" in text, text[-4000:]
    assert f"stopped early on a signal: requeueing {job_id}" in text, text[-4000:]

    assert_no_leftovers(cluster)
    return text


def assert_no_leftovers(cluster: LoopbackSlurm, grace_s: float = 30.0) -> None:
    """No process of a job is left on any node (the daemons aside), ``grace_s`` after it ended."""
    deadline = time.monotonic() + grace_s
    while (leftovers := cluster.job_leftovers()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not leftovers, leftovers


def stopped_and_resumed_at(text: str, steps: int) -> int:
    """The step the signal stopped the first run at, which the requeued run must resume from."""
    stopped = [int(s) for s in STOPPED.findall(text)]
    resumed = [int(s) for s in RESUMED.findall(text)]
    assert len(stopped) == 1 and resumed == stopped and 1 <= stopped[0] < steps, (stopped, resumed, text[-4000:])
    return stopped[0]


def micro_sft_overrides(out: Path, steps: int) -> list[str]:
    """A tiny SFT of the two-layer micro preset that runs in seconds a step on one CPU a rank."""
    return [
        f"output_dir={out}",
        "model.preset=micro",
        "encoding.max_total_tokens=128",  # the micro preset's window
        "encoding.max_prompt_tokens=64",
        f"train.steps={steps}",
        "train.eval_every=0",
        "train.eval_before=false",
        "train.eval_examples=8",
        "train.global_batch_size=8",
        "train.micro_batch_size=4",
        "train_data.synthetic.n_train=200",
        "generation.max_new_tokens=16",
    ]


def assert_rl_resumed_to_the_end(text: str, out: Path, steps: int) -> list[str]:
    """A requeued RL job resumed where the signal stopped it, trained every step once and finished;
    its Ray head's record in Ray's temp dir went with it. Returns the heads' addresses, a run each."""
    stopped_and_resumed_at(text, steps)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == steps and not summary["stopped_early"], summary
    trained = training_steps(metrics(out))
    assert trained == list(range(1, steps + 1)), trained  # each step trained once, none lost to the requeue
    # A later bare ray.init() on the node must not join a head that is gone.
    heads = re.findall(r"ray head \S+ at (\S+)", text)
    address_file = Path(get_ray_address_file(None))
    assert not (address_file.is_file() and address_file.read_text().strip() in heads), address_file.read_text()
    return heads
