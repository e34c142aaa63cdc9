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
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e._rl_helpers import ROOT, TINY_RL_ARGS, checkpoint_complete, metrics
from tests.e2e._slurm_cluster import LoopbackSlurm, require_slurm
from tests.e2e._slurm_jobs import (
    assert_rl_resumed_to_the_end,
    micro_sft_overrides,
    preempt_and_requeue,
    stopped_and_resumed_at,
)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LoopbackSlurm]:
    require_slurm()
    slurm = LoopbackSlurm()
    try:
        yield slurm.start()
    finally:
        slurm.stop()
    assert not slurm.remains(), slurm.remains()  # no namespace, daemon or folder of the cluster left


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
    text = preempt_and_requeue(
        cluster,
        ["--cpus-per-task=2", str(ROOT / "slurm" / "rl.sbatch"), "configs/reft-tiny-synthetic.yaml", *overrides],
        lambda: checkpoint_complete(out, "actor", 1),
        ["--batch"],
        log,
    )

    heads = assert_rl_resumed_to_the_end(text, out, steps)
    assert len(heads) == 2, text[-4000:]  # one line per run of the job


@pytest.mark.slow
def test_run_sbatch_sft_signal_checkpoint_requeue_resume(cluster: LoopbackSlurm, tmp_path: Path) -> None:
    steps, out, log = 30, tmp_path / "sft", tmp_path / "job.out"
    # save_every=0: the only checkpoint before the end is the one the signal asks for.
    overrides = [*micro_sft_overrides(out, steps), "train.save_every=0"]

    def trained_two_steps() -> bool:
        return sum(1 for r in metrics(out) if "loss" in r) >= 2

    text = preempt_and_requeue(
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

    stopped = stopped_and_resumed_at(text, steps)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == steps and not summary["stopped_early"], summary
    losses = [int(r["step"]) for r in metrics(out) if "loss" in r]
    assert losses == list(range(1, steps + 1)), (stopped, losses)
