"""RL recipe under faults, end to end on the tiny ReFT preset with real Ray workers.

1. SIGKILL of the critic worker mid-run: the driver stops with exit 1 and one
   ``error: critic worker (rank 0 on <node>) failed: ...`` line, quickly, and leaves no process behind.
2. Rerunning the same command resumes from the newest step complete for both roles.
3. SIGUSR1 (Slurm preemption) to the driver: it saves both roles at the current step,
   exits 0 with ``stopped_early``, and a rerun resumes from that step.

Every process is real (driver, raylet, ``ray::CriticWorker``...); a test only ever signals
processes of its own run, found as descendants of the driver it started.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e._rl_helpers import (
    ROOT,
    RUN_TIMEOUT_S,
    Run,
    checkpoint_complete,
    checkpoint_steps,
    env,
    metrics,
    resumed_step,
    rl_command,
    training_steps,
)

KILL_TO_EXIT_LIMIT_S = 60.0
CRITIC_FAILED = re.compile(r"error: critic worker \(rank 0 on \S+ at [\d.]+\) failed: ")
EXIT_GRACE_S = 10.0  # time Ray gets, after the driver exits, to take its processes down


@dataclass
class KilledRun:
    out: Path
    returncode: int
    stderr: str
    kill_to_exit_s: float
    survivors: list[str]
    metrics_before_rerun: int  # records metrics.jsonl held when the driver exited
    summary_written: bool  # summary.json after the failure (the rerun test writes one later)


@pytest.fixture(scope="module")
def killed_run(sft_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> KilledRun:
    """rl.steps=6; once step 1 is checkpointed for both roles, SIGKILL this run's critic worker."""
    out = tmp_path_factory.mktemp("rl_killed") / "out"
    run = Run(rl_command(sft_dir, out, "rl.steps=6"), out.parent / "logs")
    try:
        # The critic's step_1 is the brief's trigger; the actor's too, so that step 1 is a
        # common checkpoint whichever role finished saving first (the rerun asserts on it).
        run.wait_until(
            lambda: checkpoint_complete(out, "critic", 1) and checkpoint_complete(out, "actor", 1),
            RUN_TIMEOUT_S,
            "step_1 checkpoint of both roles",
        )
        critics, actors = run.workers("CriticWorker"), run.workers("ActorWorker")
        if len(critics) != 1 or len(actors) != 1:
            pytest.fail(f"expected one ray::CriticWorker and one ray::ActorWorker under the driver: {critics} {actors}")
        critics[0].send_signal(signal.SIGKILL)
        t_kill = time.monotonic()
        try:
            code = run.wait(KILL_TO_EXIT_LIMIT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"driver still running {KILL_TO_EXIT_LIMIT_S:.0f} s after its critic was SIGKILLed:\n"
                f"{run.stderr()[-3000:]}"
            )
        kill_to_exit = time.monotonic() - t_kill
        return KilledRun(
            out,
            code,
            run.stderr(),
            kill_to_exit,
            run.survivors(EXIT_GRACE_S),
            len(metrics(out)),
            (out / "summary.json").exists(),
        )
    finally:
        run.cleanup()


@pytest.mark.slow
def test_critic_sigkill_stops_run_with_named_error(killed_run: KilledRun) -> None:
    print(f"\ncritic SIGKILL -> driver exit: {killed_run.kill_to_exit_s:.1f} s (limit {KILL_TO_EXIT_LIMIT_S:.0f} s)")
    assert killed_run.returncode == 1, killed_run.stderr[-3000:]
    assert killed_run.kill_to_exit_s < KILL_TO_EXIT_LIMIT_S
    errors = [line for line in killed_run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and CRITIC_FAILED.match(errors[0]), errors
    assert "Traceback" not in killed_run.stderr, killed_run.stderr[-3000:]
    assert not killed_run.survivors, f"alive {EXIT_GRACE_S:.0f} s after the driver exited: {killed_run.survivors}"
    assert not killed_run.summary_written


@pytest.mark.slow
def test_critic_sigkill_error_is_last_stderr_line(killed_run: KilledRun) -> None:
    lines = [line for line in killed_run.stderr.splitlines() if line.strip()]
    assert CRITIC_FAILED.match(lines[-1]), lines[-3:]


@pytest.mark.slow
def test_rerun_after_critic_kill_resumes_from_common_checkpoint(sft_dir: Path, killed_run: KilledRun) -> None:
    out = killed_run.out
    common = max(set(checkpoint_steps(out, "actor")) & set(checkpoint_steps(out, "critic")), default=0)
    assert 1 <= common < 3, (
        f"the killed run left checkpoints actor {checkpoint_steps(out, 'actor')}, "
        f"critic {checkpoint_steps(out, 'critic')}; need a common step in [1, 3)"
    )
    before = metrics(out)
    assert len(before) == killed_run.metrics_before_rerun

    rerun = subprocess.run(
        rl_command(sft_dir, out, "rl.steps=3"),
        cwd=ROOT,
        env=env(),
        timeout=RUN_TIMEOUT_S,
        capture_output=True,
        text=True,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert resumed_step(rerun.stderr) == common, rerun.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and not summary["stopped_early"], summary

    # metrics.jsonl is append-only: the killed run's records stay as its prefix. The killed run
    # logged steps 1..k once each (k >= common); the rerun logs exactly common+1..3 and no eval
    # "before". So every step <= common appears once in the file, and a step in (common, k] -
    # trained before the kill but lost with its checkpoint - appears twice (the rerun's, later
    # line is the one that counts). Nothing at or below the resume point is trained twice.
    old, new = training_steps(before), training_steps(metrics(out)[len(before) :])
    assert old == list(range(1, len(old) + 1)) and len(old) >= common, old
    assert new == list(range(common + 1, 4)), new
    everything = old + new
    assert all(everything.count(s) == 1 for s in range(1, common + 1)), everything
    assert not any("eval_accuracy" in r and r["step"] == 0 for r in metrics(out)[len(before) :])


@pytest.mark.slow
def test_sigusr1_saves_both_roles_exits_cleanly_then_rerun_resumes(sft_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # save_every=0: the only checkpoint can be the one the stop signal asks for.
    run = Run(rl_command(sft_dir, out, "rl.steps=6", "rl.save_every=0"), tmp_path / "logs")
    try:
        run.wait_until(lambda: bool(training_steps(metrics(out))), RUN_TIMEOUT_S, "a logged training step")
        run.proc.send_signal(signal.SIGUSR1)
        code = run.wait(RUN_TIMEOUT_S)
        stderr = run.stderr()
        survivors = run.survivors(EXIT_GRACE_S)
    finally:
        run.cleanup()
    assert code == 0, stderr[-3000:]
    assert "stop signal" in stderr
    summary = json.loads((out / "summary.json").read_text())
    stopped = summary["steps"]
    assert summary["stopped_early"] and 1 <= stopped < 6, summary
    assert checkpoint_steps(out, "actor") == checkpoint_steps(out, "critic") == [stopped]
    assert training_steps(metrics(out)) == list(range(1, stopped + 1))
    assert not survivors, f"processes of the run alive {EXIT_GRACE_S:.0f} s after exit: {survivors}"

    rerun = subprocess.run(
        rl_command(sft_dir, out, f"rl.steps={stopped + 1}", "rl.save_every=0"),
        cwd=ROOT,
        env=env(),
        timeout=RUN_TIMEOUT_S,
        capture_output=True,
        text=True,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert resumed_step(rerun.stderr) == stopped, rerun.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == stopped + 1 and not summary["stopped_early"], summary
    # the resumed run compares its final evaluation with the first start's "before" one
    before = json.loads((out / "eval" / "before_summary.json").read_text())
    assert summary["accuracy_before"] == before["accuracy"], summary
    assert summary["held_out_change"]["compared"] == before["num_examples"], summary
    assert training_steps(metrics(out)) == list(range(1, stopped + 2))
