"""ContrastiveHead: shapes and the sequence-parallel gradient tag."""

import torch

from carft_nemo.models.contrastive_head import ContrastiveHead


def test_projection_shape_and_linearity():
    head = ContrastiveHead(hidden_size=16, projection_dim=8)
    h = torch.randn(5, 3, 16, dtype=torch.bfloat16)
    e = head(h)
    assert e.shape == (5, 3, 8) and e.dtype == torch.float32
    torch.testing.assert_close(e, h.float() @ head.proj.weight.t())


def test_sequence_parallel_tag():
    assert all(p.sequence_parallel for p in ContrastiveHead(4, 2, sequence_parallel=True).parameters())
    assert not any(p.sequence_parallel for p in ContrastiveHead(4, 2).parameters())
