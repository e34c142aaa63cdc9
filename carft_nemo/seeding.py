"""One way to derive the seed of every random stream of a run from its base seed.

TEMPORARY (refactor verification): reproduces the formulas the code used before, so that
per-step metrics can be compared exactly; replaced by a hash in the next commit.
"""

from __future__ import annotations

_LEGACY = {
    "rollout_sampling": lambda base, step: base * 7919 + step,
    "actor_minibatch_order": lambda base, step: base * 31 + step,
    "critic_minibatch_order": lambda base, step: base * 31 + step,
    "actor_init": lambda base, step: base,
    "critic_init": lambda base, step: base + 1,
    "reference_init": lambda base, step: base,
}


def derive_seed(base: int, stream: str, step: int = 0) -> int:
    return _LEGACY[stream](base, step)


__all__ = ["derive_seed"]
