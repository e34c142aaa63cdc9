"""The collapse guard: rules over a run's held-out accuracy and step metrics, and its state.

An RL run can collapse within a few rounds (docs/stability: at lr 3e-4 the tiny model's
held-out accuracy fell from 80.7% to 23.8% in ten rounds, KL to the reference 12-40). The
guard watches

* at every evaluation, the held-out accuracy: a rule fires when it is more than
  ``max_accuracy_drop_points`` below the best so far;
* at every step, the KL to the reference (``kl``, summed over a response's tokens), the
  sampled reward and the policy entropy: a rule fires when one of them is past its bound
  (``max_kl``, ``min_reward``, ``min_entropy``) for ``patience_steps`` steps in a row.

When a rule fires the controller (``rl/controller.py``) returns every role to the best
complete checkpoint (best held-out accuracy; the guard makes sure one is saved at each new
best), multiplies the learning rate by ``lr_factor``, records the event, and goes on; when a
rule fires again after ``max_rollbacks`` rollbacks it returns to the best checkpoint once
more and stops the run. This module is pure Python: the decisions and the state that a
resumed run reads back (``collapse_guard.json``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from carft_nemo.config import require

STATE_FILE = "collapse_guard.json"


@dataclass
class CollapseGuardConfig:
    """``rl.collapse_guard``: which rules watch the run and what a rollback does (module docstring)."""

    enabled: bool = False
    max_accuracy_drop_points: float | None = 10.0  # held-out accuracy below the best by more than this; None = off
    max_kl: float | None = None  # per-response KL to the reference above this ...
    min_reward: float | None = None  # ... mean sampled reward below this ...
    min_entropy: float | None = None  # ... policy entropy per token below this ...
    patience_steps: int = 3  # ... for this many steps in a row
    lr_factor: float = 0.5  # the learning rate (actor and critic) is multiplied by this at each rollback
    max_rollbacks: int = 3  # a rule firing after this many rollbacks stops the run (at the best checkpoint)

    def __post_init__(self) -> None:
        drop = self.max_accuracy_drop_points
        require(drop is None or 0 < drop <= 100, "max_accuracy_drop_points", f"must be in (0, 100], got {drop}")
        require(self.max_kl is None or self.max_kl > 0, "max_kl", f"must be > 0, got {self.max_kl}")
        require(self.patience_steps >= 1, "patience_steps", f"must be >= 1, got {self.patience_steps}")
        require(0 < self.lr_factor <= 1, "lr_factor", f"must be in (0, 1], got {self.lr_factor}")
        require(self.max_rollbacks >= 0, "max_rollbacks", f"must be >= 0, got {self.max_rollbacks}")

    def step_rules(self) -> list[tuple[str, str, float, int]]:
        """The configured per-step rules: ``(rule name, metric, bound, +1 above / -1 below)``."""
        rules = [("kl_above", "kl", self.max_kl, 1), ("reward_below", "reward", self.min_reward, -1)]
        rules.append(("entropy_below", "entropy", self.min_entropy, -1))
        return [(name, metric, bound, sign) for name, metric, bound, sign in rules if bound is not None]


@dataclass(frozen=True)
class Trigger:
    """A rule that fired: its name and a sentence with the figures."""

    rule: str
    detail: str


@dataclass
class GuardState:
    """Everything a resumed run needs to go on guarding where the stopped one was."""

    best_step: int | None = None  # step of the best evaluation that has a complete checkpoint
    best_accuracy: float | None = None
    lr_scale: float = 1.0
    streaks: dict[str, int] = field(default_factory=dict)  # rule -> consecutive steps past its bound
    events: list[dict[str, Any]] = field(default_factory=list)  # one per rollback (and the final stop)

    @property
    def rollbacks(self) -> int:
        return sum(1 for e in self.events if e["action"] == "rollback")


class CollapseGuard:
    """The guard's rules and state; the controller acts on what :meth:`check` returns."""

    def __init__(self, cfg: CollapseGuardConfig, out_dir: str | Path) -> None:
        self.cfg = cfg
        self.path = Path(out_dir) / STATE_FILE
        self.state = GuardState()
        if self.path.is_file():
            self.state = GuardState(**json.loads(self.path.read_text()))

    def save(self) -> None:
        """Write the state atomically (a crash leaves the old or the new file, never half of one)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self.state), indent=2) + "\n")
        os.replace(tmp, self.path)

    def is_new_best(self, accuracy: float) -> bool:
        """An evaluation at least as good as the best so far (the caller then saves a checkpoint there)."""
        return self.state.best_accuracy is None or accuracy >= self.state.best_accuracy

    def record_best(self, step: int, accuracy: float) -> None:
        self.state.best_step, self.state.best_accuracy = step, accuracy
        self.save()

    def check(self, step: int, metrics: dict[str, float], accuracy: float | None) -> Trigger | None:
        """The first rule that fires after step ``step`` (``accuracy``: its evaluation, if any)."""
        fired = None
        for rule, metric, bound, sign in self.cfg.step_rules():
            value = metrics.get(metric)
            past = value is not None and (value - bound) * sign > 0
            self.state.streaks[rule] = self.state.streaks.get(rule, 0) + 1 if past else 0
            if fired is None and self.state.streaks[rule] >= self.cfg.patience_steps:
                relation = "above" if sign > 0 else "below"
                fired = Trigger(
                    rule, f"{metric} {value:.4g} {relation} {bound:g} for {self.state.streaks[rule]} steps in a row"
                )
        drop_limit, best = self.cfg.max_accuracy_drop_points, self.state.best_accuracy
        if fired is None and accuracy is not None and drop_limit is not None and best is not None:
            drop = 100.0 * (best - accuracy)
            if drop > drop_limit:
                fired = Trigger(
                    "accuracy_drop",
                    f"held-out accuracy {100 * accuracy:.1f}% is {drop:.1f} points below the best "
                    f"{100 * best:.1f}% (step {self.state.best_step}; limit {drop_limit:g})",
                )
        return fired

    @property
    def exhausted(self) -> bool:
        """The next firing stops the run: ``max_rollbacks`` rollbacks are spent."""
        return self.state.rollbacks >= self.cfg.max_rollbacks

    def record_event(self, step: int, trigger: Trigger) -> dict[str, Any]:
        """Record a rollback (or, when exhausted, the stop) to the best checkpoint; returns the event."""
        stop = self.exhausted
        if not stop:
            self.state.lr_scale *= self.cfg.lr_factor
        event = {
            "action": "stop" if stop else "rollback",
            "step": step,
            "rule": trigger.rule,
            "detail": trigger.detail,
            "to_step": self.state.best_step,
            "best_accuracy": self.state.best_accuracy,
            "lr_scale": self.state.lr_scale,
        }
        self.state.events.append(event)
        self.state.streaks = {}
        self.save()
        return event

    def summary(self) -> dict[str, Any]:
        """What ``summary.json`` and the report show."""
        return {
            "rollbacks": self.state.rollbacks,
            "stopped": any(e["action"] == "stop" for e in self.state.events),
            "lr_scale": self.state.lr_scale,
            "best_step": self.state.best_step,
            "best_accuracy": self.state.best_accuracy,
            "events": self.state.events,
        }


__all__ = ["STATE_FILE", "CollapseGuard", "CollapseGuardConfig", "GuardState", "Trigger"]
