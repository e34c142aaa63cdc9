"""Context parallelism in the RL workers on GPUs (skipped without 2 CUDA devices): the actor's and
critic's forward outputs and one PPO + CARFT v9 update at CP=2 follow CP=1, with NCCL and, where
installed, Transformer Engine's attention over the context-parallel group (bf16 there, so the
tolerances are bf16's). The CPU equalities to 1e-5 are tests/distributed/test_context_parallel_rl.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.distributed.test_context_parallel_rl import _round
from tests.multiprocess import run_ranks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
]


def test_ppo_and_carft_at_cp2_on_gpus_follow_cp1():
    ((outputs, metrics, weights),) = run_ranks(_round, 1, 1, 1, None, backend="nccl")
    initial = {**weights["start"], "after": weights["after"]}
    for cp_outputs, cp_metrics, worst in run_ranks(_round, 2, 1, 2, initial, backend="nccl"):
        for key, expected in outputs.items():
            valid = np.isfinite(expected)
            np.testing.assert_allclose(cp_outputs[key][valid], expected[valid], rtol=3e-2, atol=3e-2, err_msg=key)
        for role in ("actor", "critic"):
            assert cp_metrics[role]["loss"] == pytest.approx(metrics[role]["loss"], rel=3e-2), role
        assert worst < 1e-2, worst
