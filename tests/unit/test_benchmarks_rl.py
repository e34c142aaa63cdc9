"""The RL step benchmarks' settings are valid configs, and their summary arithmetic is right (no Ray)."""

from pathlib import Path

import pytest

from benchmarks.carft_step import GRPO_SAMPLES, METHODS, explain, method_settings, summarize
from benchmarks.carft_step import SETTINGS as CARFT_SETTINGS
from benchmarks.ppo_step import PHASES, medians, rl_config
from benchmarks.ppo_step import SETTINGS as PPO_SETTINGS


@pytest.mark.parametrize("mode", ["full", "quick"])
@pytest.mark.parametrize("method", list(METHODS))
def test_carft_step_settings_load(tmp_path: Path, method: str, mode: str) -> None:
    settings = CARFT_SETTINGS[mode]
    cfg = rl_config(METHODS[method], tmp_path / "sft", tmp_path / "out", method_settings(settings, method))
    assert cfg.method == method
    assert cfg.rl.questions_per_step == settings.questions
    assert cfg.generation.max_new_tokens == settings.max_new_tokens
    assert cfg.rl.rollout_size == settings.questions * (GRPO_SAMPLES if method == "grpo" else 1)
    assert cfg.rl.mini_batch_size == cfg.rl.rollout_size  # one optimizer step per epoch, as the configs


@pytest.mark.parametrize("model", list(PPO_SETTINGS))
def test_ppo_step_settings_load(tmp_path: Path, model: str) -> None:
    for settings in PPO_SETTINGS[model].values():
        cfg = rl_config("configs/reft-tiny-synthetic.yaml", tmp_path, tmp_path / "out", settings)
        assert cfg.method == "reft" and cfg.rl.mini_batch_size == settings.rollout
        assert cfg.rl.rollout_size % cfg.actor.micro_batch_size == 0


def _record(total: float, samples: float, **phases: float) -> dict[str, float]:
    rec = {k: 0.0 for k in PHASES} | {"lcs": 0.0, "partial_reward": 0.0}
    rec.update(
        phases,
        total=total,
        samples=samples,
        response_length=10.0,
        sequence_length=20.0,
        cpu_actor=total,
        cpu_total=2 * total,
        cpu_training_actor=total / 2,
    )
    return rec


def test_summarize_ratios() -> None:
    records = {
        "reft": [_record(2.0, 8, logprobs=0.5), _record(4.0, 8, logprobs=0.5), _record(3.0, 8, logprobs=0.5)],
        "carft": [
            _record(2.2, 8, logprobs=0.7, lcs=0.01),
            _record(4.2, 8, logprobs=0.7),
            _record(3.3, 8, logprobs=0.7),
        ],
        "grpo": [_record(12.0, 64)] * 3,
    }
    s = summarize(records)
    assert s["carft_over_reft_step_time"] == pytest.approx(3.3 / 3.0)
    assert s["carft_over_reft_paired_median"] == pytest.approx(1.1)
    assert s["carft_extra_by_phase_s"]["logprobs"] == pytest.approx(0.2)
    assert s["grpo_over_reft_step_time_same_questions"] == pytest.approx(4.0)
    assert s["grpo_over_reft_per_sample"] == pytest.approx((12.0 / 64) / (3.0 / 8))
    assert s["carft_over_reft_cpu_time"] == pytest.approx(3.3 / 3.0)
    assert s["carft_extra_cpu_s"]["actor"] == pytest.approx(0.3)
    assert s["carft_extra_cpu_s"]["training_actor"] == pytest.approx(0.15)
    assert s["meets_goal"] is False and "MISSES" in explain(s)
    assert medians(records["reft"])["total"] == 3.0
    records["carft"][2]["cpu_total"] = 6.0  # CPU ratio 1.0 while wall says 1.1: the verdict is inconclusive
    records["carft"][2]["cpu_actor"] = 3.0
    s = summarize(records)
    assert s["meets_goal"] is None and "inconclusive" in explain(s)
