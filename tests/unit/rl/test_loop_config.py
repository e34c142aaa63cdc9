"""The RL loop's count of optimizer steps: the unit the actor's and critic's LR schedules use."""

from __future__ import annotations

from carft_nemo.rl.config import RLLoopConfig


def test_optimizer_steps_count_every_mini_batch_of_every_epoch() -> None:
    # 3 rounds x 2 epochs x (8 questions x 4 samples / 16 per mini-batch = 2 mini-batches)
    loop = RLLoopConfig(steps=3, questions_per_step=8, samples_per_question=4, ppo_epochs=2, mini_batch_size=16)
    assert loop.optimizer_steps == 12
    one_update_per_round = RLLoopConfig(steps=5, questions_per_step=32, ppo_epochs=1, mini_batch_size=32)
    assert one_update_per_round.optimizer_steps == 5
