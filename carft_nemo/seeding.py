"""One way to derive the seed of every random stream of a run from its base seed.

    seed = derive_seed(base, stream, step)

hashes ``(base, stream, step)`` with BLAKE2b into a 62-bit integer. Formulas such as
``base * 7919 + step`` collide across runs and streams (base 1 at step 7919 is base 2 at
step 0; two streams with the same multiplier share every seed); a hash gives every
(base, stream, step) its own seed, and a new stream leaves the existing ones unchanged. The
value fits ``torch.Generator.manual_seed`` and megatron's model-parallel RNG offsets.

Streams (``STREAMS``):

- ``data_order``: the permutation of the training data in each epoch (step = epoch);
- ``rollout_sampling``: the RL rollout sampler (step = RL step);
- ``replica_sampling``: a data-parallel replica's offset of a sampling seed (step = its DP rank);
- ``actor_minibatch_order`` / ``critic_minibatch_order``: the seed of one RL step's updates
  (step = RL step), from which ``epoch_order`` derives each epoch's row order (step = epoch);
- ``actor_init`` / ``critic_init`` / ``reference_init``: each Ray group's model-parallel RNG.
"""

from __future__ import annotations

import hashlib

STREAMS = (
    "data_order",
    "rollout_sampling",
    "replica_sampling",
    "actor_minibatch_order",
    "critic_minibatch_order",
    "epoch_order",
    "actor_init",
    "critic_init",
    "reference_init",
)


def derive_seed(base: int, stream: str, step: int = 0) -> int:
    """The seed of ``stream`` at ``step`` of a run seeded with ``base`` (a non-negative 62-bit int)."""
    if stream not in STREAMS:
        raise KeyError(f"unknown random stream {stream!r}; known: {', '.join(STREAMS)}")
    digest = hashlib.blake2b(f"{int(base)}/{stream}/{int(step)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


__all__ = ["STREAMS", "derive_seed"]
