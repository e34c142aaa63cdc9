"""The training loop every stage shares: the cadence of steps, evaluations, checkpoints and stops.

SFT and RL differ in what one step does, how a model is evaluated and what a checkpoint
holds; they agree on everything else, which lives here once::

    evaluate "before"                        (first start only, when asked)
    for step = start .. steps - 1:
        metrics = train_step(step)           step is 0-based; the log calls it step + 1
        log(step + 1, metrics)
        every eval_every steps (not the last):  evaluate "step_<n>"
        every save_every steps and the last:    save(n)
        after_step(n, metrics, evaluation):     a Rewind goes back to an earlier step (RL's
                                                collapse guard) or ends the run there
        a stop signal (SIGTERM / SIGUSR1, on any rank): save(n) unless just saved, stop
    evaluate "final"                         (unless stopped early by a signal)

``n`` is the number of completed steps: a checkpoint ``step_n`` resumes at step ``n``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from carft_nemo.config import require
from carft_nemo.telemetry.run_log import LOG, RunLogger
from carft_nemo.training.preemption import PreemptionHandler


@dataclass
class LoopSchedule:
    """The schedule fields of every training stage (SFT's ``train``, RL's ``rl`` extend it)."""

    steps: int = 100  # optimizer steps (SFT) or rollout + update rounds (RL)
    eval_every: int = 10  # greedy held-out evaluation every N steps (and before / after); 0 = only those
    eval_examples: int = 200  # held-out questions per evaluation; 0 = all
    save_every: int = 10  # 0 = only at the end (and on a stop signal)
    keep_checkpoints: int = 2  # newest complete checkpoints kept on disk
    seed: int = 1234
    eval_before: bool = True  # evaluate before the first step (a study that evaluated the start once: false)

    def __post_init__(self) -> None:
        for name in ("steps", "keep_checkpoints"):
            require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "eval_examples", "save_every"):
            require(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")

    def evaluates_after(self, done: int) -> bool:
        """A periodic evaluation after ``done`` completed steps (the final one is separate)."""
        return bool(self.eval_every) and done % self.eval_every == 0 and done < self.steps

    def saves_after(self, done: int) -> bool:
        """A checkpoint after ``done`` completed steps (always after the last)."""
        return done == self.steps or (bool(self.save_every) and done % self.save_every == 0)


class StageHooks(Protocol):
    """What a stage plugs into :func:`run_loop`."""

    def train_step(self, step: int) -> dict[str, float]:
        """Run step ``step`` (0-based) and return its metrics."""

    def evaluate(self, done: int, name: str) -> Any:
        """Evaluate after ``done`` completed steps; ``name`` is ``before``, ``step_<n>`` or ``final``."""

    def save(self, done: int) -> None:
        """Write the checkpoint ``step_<done>`` (and prune older ones)."""

    def after_step(self, done: int, metrics: dict[str, float], evaluation: Any, saved: bool) -> Rewind | None:
        """After step ``done`` (evaluated and saved as the cadence says): go on (None) or rewind."""


@dataclass(frozen=True)
class Rewind:
    """The hooks restored the state of step ``to_step``: the loop goes on from there, or ends."""

    to_step: int
    stop: bool = False  # end the run after the rewind (the final evaluation still runs)
    reason: str = ""


@dataclass(frozen=True)
class LoopOutcome:
    steps: int  # completed steps when the loop ended
    stopped_early: bool  # a stop signal ended it (the final evaluation was skipped)
    final_evaluation: Any  # what hooks.evaluate returned for "final" (None when stopped early)
    stop_reason: str = ""  # why a Rewind ended the run early, if one did


def run_loop(
    schedule: LoopSchedule, hooks: StageHooks, logger: RunLogger, *, start: int, evaluate_before: bool
) -> LoopOutcome:
    """Run steps ``start .. schedule.steps - 1`` with the cadence of the module docstring."""
    if evaluate_before and start == 0:
        hooks.evaluate(0, "before")
    preemption = PreemptionHandler()
    done, stopped_early, stop_reason = start, False, ""
    try:
        while done < schedule.steps:
            metrics = hooks.train_step(done)
            done += 1
            logger.log(done, metrics)
            logger.advance()
            evaluation = hooks.evaluate(done, f"step_{done}") if schedule.evaluates_after(done) else None
            saved = schedule.saves_after(done)
            if saved:
                hooks.save(done)
            rewind = hooks.after_step(done, metrics, evaluation, saved)
            if rewind is not None:
                logger.advance(rewind.to_step - done)
                done, saved = rewind.to_step, True  # the state of a complete checkpoint
                if rewind.stop:
                    stop_reason = rewind.reason
                    break
            if done < schedule.steps and preemption.should_stop():
                LOG.warning("stop signal %s: saving at step %d and exiting", preemption.received, done)
                if not saved:
                    hooks.save(done)
                stopped_early = True
                break
    finally:
        preemption.restore()
    final = None if stopped_early else hooks.evaluate(done, "final")
    return LoopOutcome(done, stopped_early, final, stop_reason)


__all__ = ["LoopOutcome", "LoopSchedule", "Rewind", "StageHooks", "run_loop"]
