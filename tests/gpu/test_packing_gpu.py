"""Sequence packing on a GPU (skipped without CUDA): packed scoring equals unpacked, through
Transformer Engine's THD layout (one stream, sequences by cu_seqlens) where TE is installed and
through our block-diagonal mask otherwise. bf16 on GPUs, hence bf16's tolerance; the CPU
equality to 1e-5 is tests/distributed/test_packing.py."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.test_packing import LENGTHS, _scoring
from tests.multiprocess import run_ranks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("max_tokens", [0, 40])
def test_packed_scoring_on_a_gpu_equals_unpacked(max_tokens):
    ((plain, packed),) = run_ranks(_scoring, 1, max_tokens, backend="nccl")
    for row, n in enumerate(LENGTHS):
        for key in plain:
            real = n - 1 if key == "logprobs" else n
            a, b = torch.from_numpy(plain[key][row]), torch.from_numpy(packed[key][row])
            torch.testing.assert_close(b[:real], a[:real], atol=3e-2, rtol=3e-2, msg=f"{key} row {row}")
