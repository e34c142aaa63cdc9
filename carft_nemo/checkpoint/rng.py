"""Capture and restore every random-number generator a training step draws from.

Python's ``random``, NumPy's global generator, torch's CPU generator, the accelerator's
generator and megatron's model-parallel RNG tracker (the named states forked for dropout
inside tensor-parallel regions). Restoring all of them is what makes a resumed run draw
the same samples, dropout masks and shuffles as an uninterrupted one.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from carft_nemo.distributed import device


def capture_rng_state() -> dict[str, Any]:
    """A picklable snapshot of this process's RNG states (CPU tensors)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "accelerator": torch.cuda.get_rng_state().cpu() if device.has_cuda() else None,
        "megatron_tracker": {k: v.cpu() for k, v in get_cuda_rng_tracker().get_states().items()},
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.has_cuda() and state.get("accelerator") is not None:
        torch.cuda.set_rng_state(state["accelerator"])
    get_cuda_rng_tracker().set_states(dict(state["megatron_tracker"]))
