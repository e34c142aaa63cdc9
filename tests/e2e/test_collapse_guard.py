"""The collapse guard end to end: a learning rate that breaks the tiny model, real Ray workers.

One SFT checkpoint with some held-out accuracy; an RL run at lr 5e-3 (its first update
wrecks the model) with the guard on: the drop rule fires, every role goes back to the best
checkpoint (the start), the learning rate is cut, the event is logged and recorded. The
driver is then SIGKILLed and the same command rerun: the rerun carries on with the guard's
state (the cut learning rate, the rollback count) and ends above the collapsed accuracy.
A second run with no rollback allowed stops at the best checkpoint instead.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e._rl_helpers import ROOT, RUN_TIMEOUT_S, Run, env, metrics, rl_command, sft_command, training_steps

pytestmark = pytest.mark.slow

BREAKING_LR = 5e-3
GUARDED = [
    "rl.steps=4",
    "rl.eval_every=1",
    "rl.eval_before=true",
    "rl.eval_examples=64",
    "eval_generation.max_new_tokens=64",
    "rl.questions_per_step=16",
    "rl.mini_batch_size=16",
    f"actor.optim.lr={BREAKING_LR}",
    "rl.collapse_guard.enabled=true",
    "rl.collapse_guard.max_accuracy_drop_points=5",
    "rl.collapse_guard.lr_factor=0.01",
]


@pytest.fixture(scope="module")
def trained_sft(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SFT checkpoint that answers some held-out questions (2 steps answer none)."""
    out = tmp_path_factory.mktemp("guard_sft") / "sft"
    command = [*sft_command(out), "train.steps=200", "train.save_every=200"]
    done = subprocess.run(command, cwd=ROOT, env=env(), timeout=RUN_TIMEOUT_S, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"SFT failed:\n{done.stderr[-3000:]}")
    return out


def _guard_state(out: Path) -> dict:
    path = out / "collapse_guard.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _accuracies(out: Path) -> list[float]:
    return [r["eval_accuracy"] for r in metrics(out) if "eval_accuracy" in r]


@dataclass
class GuardedRun:
    out: Path
    killed_state: dict  # collapse_guard.json when the first driver was killed
    stderr_first: str
    stderr_rerun: str
    returncode: int


@pytest.fixture(scope="module")
def guarded(trained_sft: Path, tmp_path_factory: pytest.TempPathFactory) -> GuardedRun:
    out = tmp_path_factory.mktemp("guarded") / "out"
    command = rl_command(trained_sft, out, *GUARDED)
    first = Run(command, out.parent / "logs-first")
    try:
        first.wait_until(lambda: bool(_guard_state(out).get("events")), RUN_TIMEOUT_S, "a rollback")
        first.wait_until(lambda: "rolled back to step" in first.stderr(), 60, "the rollback's log line")
    finally:
        first.cleanup()  # SIGKILL: the driver gets no chance to write anything more
    killed_state = _guard_state(out)
    rerun = Run(command, out.parent / "logs-rerun")
    try:
        code = rerun.wait(RUN_TIMEOUT_S)
    finally:
        rerun.cleanup()
    return GuardedRun(out, killed_state, first.stderr(), rerun.stderr(), code)


def test_a_collapse_is_rolled_back_with_a_lower_lr_and_recorded(guarded: GuardedRun) -> None:
    event = guarded.killed_state["events"][0]
    assert event["action"] == "rollback" and event["rule"] == "accuracy_drop" and event["to_step"] == 0
    assert event["lr_scale"] == pytest.approx(0.01)
    assert "collapse guard: accuracy_drop at step" in guarded.stderr_first
    assert "rolled back to step 0" in guarded.stderr_first
    assert guarded.returncode == 0, guarded.stderr_rerun[-3000:]
    rows = metrics(guarded.out)
    assert any(r.get("guard/rollback_to") == 0.0 for r in rows)  # the same sink feeds TensorBoard
    summary = json.loads((guarded.out / "summary.json").read_text())
    start, collapsed = _accuracies(guarded.out)[0], event_accuracy(guarded)
    assert collapsed < start - 0.05  # the breaking LR did break the model
    assert summary["accuracy_after"] > collapsed, (start, collapsed, summary["accuracy_after"])
    assert summary["collapse_guard"]["events"][0] == event


def event_accuracy(run: GuardedRun) -> float:
    """The held-out accuracy the rule fired on (its detail names it in %)."""
    detail = run.killed_state["events"][0]["detail"]
    return float(detail.split("held-out accuracy ")[1].split("%")[0]) / 100


def test_the_rerun_goes_on_with_the_guards_state(guarded: GuardedRun) -> None:
    summary = json.loads((guarded.out / "summary.json").read_text())
    assert summary["collapse_guard"]["rollbacks"] >= 1  # the killed run's rollback is still counted
    state = _guard_state(guarded.out)
    assert state["events"][: len(guarded.killed_state["events"])] == guarded.killed_state["events"]
    rerun_rows = [r for r in metrics(guarded.out) if "actor_loss" in r][-1:]
    assert rerun_rows and rerun_rows[0]["lr"] <= BREAKING_LR * 0.01 * (1 + 1e-6)  # the cut LR, not the config's
    assert training_steps(metrics(guarded.out))[-1] == 4


def test_with_no_rollback_left_the_run_stops_at_its_best_checkpoint(
    trained_sft: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    out = tmp_path_factory.mktemp("guard_stop") / "out"
    command = rl_command(trained_sft, out, *GUARDED, "rl.collapse_guard.max_rollbacks=0")
    done = subprocess.run(command, cwd=ROOT, env=env(), timeout=RUN_TIMEOUT_S, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["collapse_guard"]["stopped"] and summary["steps"] == 0
    assert "rl.collapse_guard.max_rollbacks" in summary["stop_reason"]
    assert "stopped at the best checkpoint, step 0" in done.stderr
    assert summary["accuracy_after"] == pytest.approx(_accuracies(out)[0])  # the start's model, evaluated again
    actor = out / "checkpoints" / "actor"
    assert not [p.name for p in actor.iterdir() if p.name.startswith("step_")]  # no collapsed state to resume
