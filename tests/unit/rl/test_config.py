"""RL loop settings: the count of optimizer steps (the LR schedules' unit) and the critic warm-up's checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from carft_nemo.config import ConfigError, load_config
from carft_nemo.rl.config import RLConfig, RLLoopConfig


def test_optimizer_steps_count_every_mini_batch_of_every_epoch() -> None:
    # 3 rounds x 2 epochs x (8 questions x 4 samples / 16 per mini-batch = 2 mini-batches)
    loop = RLLoopConfig(steps=3, questions_per_step=8, samples_per_question=4, ppo_epochs=2, mini_batch_size=16)
    assert loop.optimizer_steps == 12
    one_update_per_round = RLLoopConfig(steps=5, questions_per_step=32, ppo_epochs=1, mini_batch_size=32)
    assert one_update_per_round.optimizer_steps == 5


def test_critic_warmup_needs_a_separate_critic_and_policy_rounds_left() -> None:
    tiny = Path(__file__).resolve().parents[3] / "configs" / "reft-tiny-synthetic.yaml"
    ok = load_config(RLConfig, tiny, ["rl.critic_warmup_steps=5", "rl.steps=40"])
    assert ok.rl.critic_warmup_steps == 5
    with pytest.raises(ConfigError, match=r"rl\.critic_warmup_steps: .*critic\.layout: separate"):
        load_config(RLConfig, tiny, ["rl.critic_warmup_steps=5", "critic.layout=shared"])
    with pytest.raises(ConfigError, match=r"rl\.critic_warmup_steps: 40 warm-up rounds leave none"):
        load_config(RLConfig, tiny, ["rl.critic_warmup_steps=40", "rl.steps=40"])
    with pytest.raises(ConfigError, match=r"rl\.critic_warmup_steps: must be >= 0"):
        load_config(RLConfig, tiny, ["rl.critic_warmup_steps=-1"])
