"""The loop every stage shares: evaluations, checkpoints and stop signals at the right steps."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from carft_nemo.config import ConfigError
from carft_nemo.telemetry.run_log import RunLogger, read_metrics
from carft_nemo.training.loop import LoopSchedule, Rewind, run_loop


class RecordingStage:
    """A stage whose steps only record what the loop asked; ``signal_at``: raise SIGUSR1 during that step."""

    def __init__(self, signal_at: int | None = None, rewinds: dict[int, Rewind] | None = None) -> None:
        self.calls: list[tuple[str, int, str]] = []
        self.signal_at = signal_at
        self.rewinds = dict(rewinds or {})  # done -> the Rewind after_step returns there (once)

    def train_step(self, step: int) -> dict[str, float]:
        self.calls.append(("train", step, ""))
        if step == self.signal_at:
            os.kill(os.getpid(), signal.SIGUSR1)  # as Slurm does before the time limit
        return {"loss": float(step)}

    def evaluate(self, done: int, name: str) -> str:
        self.calls.append(("eval", done, name))
        return name

    def save(self, done: int) -> None:
        self.calls.append(("save", done, ""))

    def after_step(self, done: int, metrics: dict, evaluation, saved: bool) -> Rewind | None:
        return self.rewinds.pop(done, None)

    def of(self, kind: str) -> list:
        return [(step, name) if kind == "eval" else step for k, step, name in self.calls if k == kind]


def _run(tmp_path: Path, schedule: LoopSchedule, stage: RecordingStage, *, start: int = 0, before: bool = True):
    logger = RunLogger(tmp_path, "test", enabled=True, total_steps=schedule.steps, tensorboard=False, progress=False)
    try:
        return run_loop(schedule, stage, logger, start=start, evaluate_before=before)
    finally:
        logger.close()


def test_cadence_of_a_whole_run(tmp_path: Path) -> None:
    stage = RecordingStage()
    outcome = _run(tmp_path, LoopSchedule(steps=7, eval_every=3, save_every=2), stage)
    assert stage.of("train") == [0, 1, 2, 3, 4, 5, 6]
    assert stage.of("eval") == [(0, "before"), (3, "step_3"), (6, "step_6"), (7, "final")]
    assert stage.of("save") == [2, 4, 6, 7]  # every save_every, and the last step
    assert (outcome.steps, outcome.stopped_early, outcome.final_evaluation) == (7, False, "final")
    logged = [row["step"] for row in read_metrics(tmp_path / "metrics.jsonl")]
    assert logged == [1, 2, 3, 4, 5, 6, 7]  # step n = n completed steps


def test_a_resumed_run_starts_at_its_checkpoint_without_a_before_evaluation(tmp_path: Path) -> None:
    stage = RecordingStage()
    _run(tmp_path, LoopSchedule(steps=7, eval_every=3, save_every=2), stage, start=4)
    assert stage.of("train") == [4, 5, 6]
    assert stage.of("eval") == [(6, "step_6"), (7, "final")]
    assert stage.of("save") == [6, 7]


def test_zero_intervals_mean_only_before_final_and_the_last_save(tmp_path: Path) -> None:
    stage = RecordingStage()
    _run(tmp_path, LoopSchedule(steps=3, eval_every=0, save_every=0), stage, before=False)
    assert stage.of("eval") == [(3, "final")] and stage.of("save") == [3]


@pytest.mark.parametrize("save_every, saves", [(10, [3]), (3, [3])])
def test_a_stop_signal_saves_once_and_skips_the_final_evaluation(tmp_path: Path, save_every: int, saves) -> None:
    stage = RecordingStage(signal_at=2)  # the signal arrives during the third step
    handler = signal.getsignal(signal.SIGUSR1)
    outcome = _run(tmp_path, LoopSchedule(steps=8, eval_every=0, save_every=save_every), stage)
    assert stage.of("train") == [0, 1, 2]
    assert stage.of("save") == saves  # saved at the stop, not twice when it was a save step anyway
    assert stage.of("eval") == [(0, "before")]
    assert outcome.stopped_early and outcome.steps == 3 and outcome.final_evaluation is None
    assert signal.getsignal(signal.SIGUSR1) == handler  # the loop restored the handler it found


def test_schedule_fields_are_validated_relative_to_their_section() -> None:
    with pytest.raises(ConfigError, match="^steps: must be >= 1"):
        LoopSchedule(steps=0)
    with pytest.raises(ConfigError, match="^eval_every: must be >= 0"):
        LoopSchedule(eval_every=-1)


def test_a_rewind_goes_back_and_replays_the_steps_after_it(tmp_path: Path) -> None:
    stage = RecordingStage(rewinds={4: Rewind(to_step=2)})
    outcome = _run(tmp_path, LoopSchedule(steps=5, eval_every=2, save_every=2), stage, before=False)
    assert stage.of("train") == [0, 1, 2, 3, 2, 3, 4]  # steps 3 and 4 run again from step 2's state
    assert stage.of("eval") == [(2, "step_2"), (4, "step_4"), (4, "step_4"), (5, "final")]
    assert stage.of("save") == [2, 4, 4, 5]
    assert outcome.steps == 5 and not outcome.stopped_early and outcome.stop_reason == ""
    logged = [row["step"] for row in read_metrics(tmp_path / "metrics.jsonl")]
    assert logged == [1, 2, 3, 4, 3, 4, 5]


def test_a_stopping_rewind_ends_the_run_at_its_step_with_a_final_evaluation(tmp_path: Path) -> None:
    stage = RecordingStage(rewinds={3: Rewind(to_step=1, stop=True, reason="guard spent")})
    outcome = _run(tmp_path, LoopSchedule(steps=6, eval_every=0, save_every=1), stage, before=False)
    assert stage.of("train") == [0, 1, 2]
    assert stage.of("eval") == [(1, "final")]  # the restored state is evaluated
    assert (outcome.steps, outcome.stopped_early, outcome.stop_reason) == (1, False, "guard spent")
