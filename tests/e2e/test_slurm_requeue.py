"""The Slurm launchers under a real Slurm: preemption signal -> checkpoint -> requeue -> resume.

A one-node Slurm cluster runs in a private network namespace (``_slurm_cluster``). Once a job
has made progress the test sends SIGUSR1 as the scripts' ``--signal`` directives do before the
time limit. The recipe must save and exit with ``stopped_early``, the script must requeue the
job, the requeued job must resume from the saved step and finish, the log must keep both runs,
and nothing of the job may outlive it.

* ``slurm/rl.sbatch`` (tiny ReFT; the script starts the Ray head through ``srun``, as on a
  cluster): the signal goes to the batch shell (``B:USR1``), which forwards it to the controller.
* ``slurm/run.sbatch`` (tiny SFT): the signal goes to the job's tasks (``USR1``).
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from ray._common.utils import get_ray_address_file

from tests.e2e._rl_helpers import RESUMED, ROOT, TINY_RL_ARGS, checkpoint_complete, metrics, training_steps
from tests.e2e._slurm_cluster import LoopbackSlurm, require_slurm

JOB_TIMEOUT_S = 600.0
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}
STOPPED = re.compile(r"stop signal \S+: saving at step (\d+) and exiting")


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


def _preempt_and_requeue(
    cluster: LoopbackSlurm, sbatch_args: list[str], progressed: Callable[[], bool], scancel_args: list[str], log: Path
) -> str:
    """Submit; once ``progressed()``, signal the job; wait for its requeued run to finish.

    Returns the job's log, after checking that the job completed with exit 0 after
    exactly one requeue and that none of its processes is left.
    """
    env = {
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "CARFT_PYTHON": sys.executable,
        "RAY_AUTH_MODE": "token",
    }  # rl.sbatch's own default: a fresh token for the job's Ray
    submit = cluster.run(
        [
            "sbatch",
            "--parsable",
            "--nodes=1",
            "--gpus-per-node=0",
            "--mem=3000",
            "--time=20",
            f"--output={log}",
            *sbatch_args,
        ],
        cwd=ROOT,
        env=env,
    )
    job_id = submit.stdout.strip().split(";")[0]

    def ready_to_signal() -> bool:
        state = _job(cluster, job_id).get("JobState")
        if state in FINAL_STATES:
            _fail(f"job {job_id} ended ({state}) before the test could signal it", log, cluster)
        return state == "RUNNING" and progressed()

    _wait("progress to interrupt", ready_to_signal, JOB_TIMEOUT_S, log, cluster)
    cluster.run(["scancel", *scancel_args, "--signal=USR1", job_id])

    def finished() -> dict[str, str] | None:
        job = _job(cluster, job_id)
        return job if job.get("JobState") in FINAL_STATES and int(job.get("Restarts", "0")) >= 1 else None

    job = _wait("requeued run that finished", finished, JOB_TIMEOUT_S, log, cluster)
    text = log.read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", (job, text[-4000:])
    assert int(job["Restarts"]) == 1, job
    # The log keeps both runs (--open-mode=append).
    assert f"job {job_id} restart 0" in text and f"job {job_id} restart 1" in text, text[-4000:]
    assert f"stopped early on a signal: requeueing {job_id}" in text, text[-4000:]

    deadline = time.monotonic() + 30
    while (leftovers := cluster.job_leftovers()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not leftovers, leftovers
    return text


def _stopped_and_resumed_at(text: str, steps: int) -> int:
    """The step the signal stopped the first run at, which the requeued run must resume from."""
    stopped = [int(s) for s in STOPPED.findall(text)]
    resumed = [int(s) for s in RESUMED.findall(text)]
    assert len(stopped) == 1 and resumed == stopped and 1 <= stopped[0] < steps, (stopped, resumed, text[-4000:])
    return stopped[0]


@pytest.mark.slow
def test_rl_sbatch_signal_checkpoint_requeue_resume(cluster: LoopbackSlurm, sft_dir: Path, tmp_path: Path) -> None:
    steps, out, log = 6, tmp_path / "rl", tmp_path / "job.out"
    # The value head shares the policy (critic.layout=shared): actor + reward worker fit 2 CPUs.
    overrides = [
        f"sft_checkpoint={sft_dir}",
        f"output_dir={out}",
        *TINY_RL_ARGS,
        "critic.layout=shared",
        f"rl.steps={steps}",
    ]
    text = _preempt_and_requeue(
        cluster,
        ["--cpus-per-task=2", str(ROOT / "slurm" / "rl.sbatch"), "configs/reft-tiny-synthetic.yaml", *overrides],
        lambda: checkpoint_complete(out, "actor", 1),
        ["--batch"],
        log,
    )

    _stopped_and_resumed_at(text, steps)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == steps and not summary["stopped_early"], summary
    trained = training_steps(metrics(out))
    assert trained == list(range(1, steps + 1)), trained  # each step trained once, none lost to the requeue
    # The head's record in Ray's temp dir is gone with it: a later bare ray.init() must not join it.
    head = re.findall(r"ray head \S+ at (\S+)", text)
    assert len(head) == 2, text[-4000:]  # one line per run of the job
    address_file = Path(get_ray_address_file(None))
    assert not (address_file.is_file() and address_file.read_text().strip() in head), address_file.read_text()


@pytest.mark.slow
def test_run_sbatch_sft_signal_checkpoint_requeue_resume(cluster: LoopbackSlurm, tmp_path: Path) -> None:
    steps, out, log = 30, tmp_path / "sft", tmp_path / "job.out"
    # save_every=0: the only checkpoint before the end is the one the signal asks for.
    overrides = [
        f"output_dir={out}",
        "model.preset=micro",
        "encoding.max_total_tokens=128",  # the micro preset's window
        "encoding.max_prompt_tokens=64",
        f"train.steps={steps}",
        "train.save_every=0",
        "train.eval_every=0",
        "train.eval_before=false",
        "train.eval_examples=8",
        "train.global_batch_size=8",
        "train.micro_batch_size=4",
        "train_data.synthetic.n_train=200",
        "generation.max_new_tokens=16",
    ]

    def trained_two_steps() -> bool:
        return sum(1 for r in metrics(out) if "loss" in r) >= 2

    text = _preempt_and_requeue(
        cluster,
        [
            "--ntasks-per-node=1",
            "--cpus-per-task=1",
            str(ROOT / "slurm" / "run.sbatch"),
            "recipes/sft.py",
            "configs/sft-tiny-synthetic.yaml",
            *overrides,
        ],
        trained_two_steps,
        [],
        log,
    )

    stopped = _stopped_and_resumed_at(text, steps)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == steps and not summary["stopped_early"], summary
    losses = [int(r["step"]) for r in metrics(out) if "loss" in r]
    assert losses == list(range(1, steps + 1)), (stopped, losses)
