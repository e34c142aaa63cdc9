"""The collapse guard's rules and state (rl/collapse_guard.py), without a model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from carft_nemo.config import ConfigError
from carft_nemo.rl.collapse_guard import STATE_FILE, CollapseGuard, CollapseGuardConfig


def test_accuracy_drop_fires_only_past_the_limit_below_the_best(tmp_path: Path) -> None:
    guard = CollapseGuard(CollapseGuardConfig(enabled=True, max_accuracy_drop_points=10.0), tmp_path)
    assert guard.check(5, {}, 0.70) is None  # no best yet: nothing to compare with
    guard.record_best(5, 0.70)
    assert guard.check(10, {}, 0.605) is None  # 9.5 points below
    trigger = guard.check(15, {}, 0.59)  # 11 points below
    assert trigger is not None and trigger.rule == "accuracy_drop"
    assert "59.0%" in trigger.detail and "11.0 points" in trigger.detail and "step 5" in trigger.detail


def test_a_step_rule_needs_its_bound_crossed_for_patience_steps_in_a_row(tmp_path: Path) -> None:
    cfg = CollapseGuardConfig(enabled=True, max_kl=5.0, min_entropy=0.1, patience_steps=3)
    guard = CollapseGuard(cfg, tmp_path)
    seen = [guard.check(s, {"kl": kl, "entropy": 1.0}, None) for s, kl in enumerate([6, 7, 1, 6, 6])]
    assert seen == [None] * 5  # the streak broke at step 2
    trigger = guard.check(5, {"kl": 8.0, "entropy": 1.0}, None)
    assert trigger is not None and trigger.rule == "kl_above" and "3 steps in a row" in trigger.detail
    guard2 = CollapseGuard(cfg, tmp_path / "b")
    fired = [guard2.check(s, {"kl": 0.1, "entropy": 0.05}, None) for s in range(3)]
    assert fired[:2] == [None, None] and fired[2].rule == "entropy_below"


def test_a_rule_left_unset_never_fires(tmp_path: Path) -> None:
    guard = CollapseGuard(CollapseGuardConfig(enabled=True, max_accuracy_drop_points=None), tmp_path)
    guard.record_best(1, 0.9)
    assert all(guard.check(s, {"kl": 1e6, "reward": -1.0, "entropy": 0.0}, 0.0) is None for s in range(10))


def test_rollbacks_lower_the_lr_and_the_one_after_the_last_stops(tmp_path: Path) -> None:
    cfg = CollapseGuardConfig(enabled=True, lr_factor=0.5, max_rollbacks=2)
    guard = CollapseGuard(cfg, tmp_path)
    guard.record_best(4, 0.8)
    events = [guard.record_event(step, guard.check(step, {}, 0.5)) for step in (6, 8, 10)]
    assert [e["action"] for e in events] == ["rollback", "rollback", "stop"]
    assert [e["lr_scale"] for e in events] == [0.5, 0.25, 0.25]
    assert all(e["to_step"] == 4 and e["rule"] == "accuracy_drop" for e in events)
    summary = guard.summary()
    assert summary["rollbacks"] == 2 and summary["stopped"] and summary["best_step"] == 4


def test_the_state_survives_a_restart(tmp_path: Path) -> None:
    cfg = CollapseGuardConfig(enabled=True, max_kl=1.0, patience_steps=2)
    guard = CollapseGuard(cfg, tmp_path)
    guard.record_best(3, 0.75)
    guard.check(4, {"kl": 2.0}, None)  # a streak of one, saved with the next change
    guard.record_event(5, guard.check(5, {"kl": 2.0}, None))
    again = CollapseGuard(cfg, tmp_path)
    assert again.state == guard.state
    assert again.state.lr_scale == 0.5 and again.state.rollbacks == 1 and again.state.best_step == 3
    assert json.loads((tmp_path / STATE_FILE).read_text())["events"][0]["rule"] == "kl_above"


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("lr_factor", 0.0, "lr_factor: must be in"),
        ("max_accuracy_drop_points", -1.0, "max_accuracy_drop_points: must be in"),
        ("patience_steps", 0, "patience_steps: must be >= 1"),
        ("max_rollbacks", -1, "max_rollbacks: must be >= 0"),
    ],
)
def test_bad_settings_are_refused_by_name(field: str, value, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        CollapseGuardConfig(**{field: value})
