"""Batched, exact longest common subsequence (LCS) of token sequences, in torch.

CARFT's negative signal splits a wrong on-policy CoT and the annotated CoT of the same
question into their common part (the LCS) and their remainders. The paper code
(``cl.py``) runs a pure-Python O(nm) dynamic programme per pair, once per micro-batch; here
every pair of the batch is solved at once with tensor operations that run on CPU and GPU.

Recurrence (1-based, ``L[0, j] = L[i, 0] = 0``)::

    L[i, j] = L[i-1, j-1] + 1                  if a_i == b_j
            = max(L[i-1, j], L[i, j-1])        otherwise

Row-wise vectorisation: let ``c_j = max(L[i-1, j], L[i-1, j-1] + [a_i == b_j])``. Because
``L[i, j] = max(c_j, L[i, j-1])`` and ``L[i, 0] = 0 <= c_j``, the whole row is a prefix
maximum, ``L[i, :] = cummax_j(c_j)``: one Python iteration per row of ``a`` (never per
cell), each a handful of tensor ops over ``[batch, m]``. The full table is kept
(``(n+1) * batch * (m+1)`` int16/int32 entries: 33 MB for 64 pairs of 512 tokens, plus
``n * batch * m`` match flags computed in one op).

Traceback, also one iteration per row and vectorised over the batch: rows of ``L`` are
non-decreasing, so from cell ``(i, j)`` with value ``v`` the path walks left along the
plateau to ``j0 = searchsorted(L[i, :], v)``, the first column where row ``i`` reaches
``v``. There either ``L[i-1, j0] == v`` (``a_i`` is not needed: go up) or, since both the
left and upper neighbours are ``v - 1``, the value came from a match on the diagonal:
``a_i`` and ``b_{j0}`` are in the LCS. Every step keeps "value still to collect =
``L[i, j]``", so the marked pairs form a common subsequence of length ``L[n, m]``.

Why rows and not anti-diagonals: n Python iterations instead of n + m, each on contiguous
rows; the prefix maximum (``torch.cummax``) is the dominant cost. A bit-parallel
(Hyyro) forward pass would cut that work ~64x but needs multi-word carries and a
bit-level traceback; not done here.

Differences from the paper code (``cl.py``): same DP, but batched and in torch (no Python
loop over cells); the paper ran it on decoded token *strings* of the whole sequence
(prompt and padding included), we run it on token ids of whatever span the caller
selects (the contrastive module passes CoT tokens only, see
``carft_nemo.algorithms.contrastive.lcs_spans``). Among several LCSs the two
tracebacks may pick different (equally long) ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LcsResult", "lcs_masks", "lcs_table"]


@dataclass(frozen=True)
class LcsResult:
    """LCS of each pair: ``length [B]`` (int64), membership ``mask_a [B, n]``, ``mask_b [B, m]`` (bool).

    ``mask_a[k].sum() == mask_b[k].sum() == length[k]`` and ``a[k][mask_a[k]]`` equals
    ``b[k][mask_b[k]]`` element-wise (the same common subsequence, in order).
    """

    length: Tensor
    mask_a: Tensor
    mask_b: Tensor


def _lengths_or_full(x: Tensor, lengths: Tensor | None) -> Tensor:
    if lengths is None:
        return torch.full((x.shape[0],), x.shape[1], dtype=torch.long, device=x.device)
    if lengths.shape != (x.shape[0],):
        raise ValueError(f"lengths must have shape [{x.shape[0]}], got {tuple(lengths.shape)}")
    if bool((lengths < 0).any()) or bool((lengths > x.shape[1]).any()):
        raise ValueError(f"lengths must lie in [0, {x.shape[1]}]")
    return lengths.to(device=x.device, dtype=torch.long)


def lcs_table(a: Tensor, b: Tensor, a_lengths: Tensor | None = None,
              b_lengths: Tensor | None = None) -> Tensor:
    """The LCS dynamic-programming table of each pair, ``L[i, k, j]``, shape ``[n+1, B, m+1]``.

    ``a [B, n]`` and ``b [B, m]`` are integer token ids; positions at or beyond
    ``a_lengths[k]`` / ``b_lengths[k]`` are padding and never match, so
    ``L[n, k, m]`` is the LCS length of the unpadded pair. Row ``i`` holds
    ``L[i, j] = cummax_j(max(L[i-1, j], L[i-1, j-1] + [a_i == b_j]))`` (module docstring).
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"expected a [B, n] and b [B, m], got {tuple(a.shape)} and {tuple(b.shape)}")
    batch, n = a.shape
    m = b.shape[1]
    a_len = _lengths_or_full(a, a_lengths)
    b_len = _lengths_or_full(b, b_lengths)
    # int16 halves memory traffic; LCS values never exceed min(n, m).
    dtype = torch.int16 if min(n, m) < torch.iinfo(torch.int16).max else torch.int32
    # Only the boundary needs zeros; every other cell is written once below.
    table = torch.empty(n + 1, batch, m + 1, dtype=dtype, device=a.device)
    table[0].zero_()
    table[:, :, 0].zero_()
    if n == 0 or m == 0:
        return table
    valid_b = torch.arange(m, device=a.device)[None, :] < b_len[:, None]  # [B, m]
    valid_a = torch.arange(n, device=a.device)[:, None] < a_len[None, :]  # [n, B]
    # All match rows at once ([n, B, m] bools): one dispatch instead of one per row. Padding is
    # masked explicitly (no sentinel id), so any id value, negative included, is allowed.
    matches = (a.t()[:, :, None] == b[None, :, :]) & valid_a[:, :, None] & valid_b[None, :, :]
    boost = torch.empty(batch, m, dtype=dtype, device=a.device)
    # Preallocated outputs: cummax without ``out=`` also zero-fills fresh buffers every row.
    values = torch.empty(batch, m, dtype=dtype, device=a.device)
    indices = torch.empty(batch, m, dtype=torch.long, device=a.device)
    for i in range(n):
        prev = table[i]
        torch.add(prev[:, :-1], matches[i], out=boost)  # bool promotes to the table dtype
        torch.maximum(boost, prev[:, 1:], out=boost)
        torch.cummax(boost, dim=1, out=(values, indices))
        table[i + 1, :, 1:] = values
    return table


def _traceback(table: Tensor) -> tuple[Tensor, Tensor]:
    """Membership masks ``[B, n]``, ``[B, m]`` of one LCS per pair from :func:`lcs_table`'s table."""
    n_plus_1, batch, m_plus_1 = table.shape
    n, m = n_plus_1 - 1, m_plus_1 - 1
    device = table.device
    # Per row: did the path take the diagonal there, and at which column (1-based)?
    diag_rows = torch.zeros(n, batch, 1, dtype=torch.bool, device=device)
    first_rows = torch.zeros(n, batch, 1, dtype=torch.long, device=device)
    col = torch.full((batch, 1), m, dtype=torch.long, device=device)
    for i in range(n, 0, -1):
        row = table[i]
        value = row.gather(1, col)  # [B, 1] LCS length still to collect
        if i % 32 == 0 and not bool(value.any()):
            break  # every pair has collected its whole LCS (checked now and then: it syncs on GPU)
        first = torch.searchsorted(row, value)  # first column where row i reaches `value`
        # Diagonal iff the cell above differs (value 0: column 0 above is 0 too, so "up").
        diag = table[i - 1].gather(1, first) != value
        diag_rows[i - 1] = diag
        first_rows[i - 1] = first
        col = first - diag.long()
    mask_a = diag_rows[:, :, 0].t().contiguous()
    chosen = torch.where(diag_rows, first_rows - 1, m)[:, :, 0].t()  # m: a dummy column
    mask_b = torch.zeros(batch, m + 1, dtype=torch.bool, device=device)
    mask_b.scatter_(1, chosen, True)
    return mask_a, mask_b[:, :m]


def lcs_masks(a: Tensor, b: Tensor, a_lengths: Tensor | None = None,
              b_lengths: Tensor | None = None) -> LcsResult:
    """Exact LCS of each pair ``(a[k, :a_lengths[k]], b[k, :b_lengths[k]])`` with membership masks.

    Args:
        a: ``[B, n]`` integer token ids (right-padded; padding values are ignored).
        b: ``[B, m]`` integer token ids.
        a_lengths, b_lengths: ``[B]`` numbers of real tokens; ``None`` = the full width.

    Returns:
        :class:`LcsResult` with ``length [B]`` and masks ``[B, n]`` / ``[B, m]``, false on
        padding. Work: O(B n m) tensor ops in O(n) Python iterations; memory O(B n m).
    """
    a_len = _lengths_or_full(a, a_lengths)
    b_len = _lengths_or_full(b, b_lengths)
    batch, n = a.shape
    m = b.shape[1]
    # Trim shared padding so the O(n m) work only covers the longest real sequences.
    n_used = int(a_len.max()) if batch else 0
    m_used = int(b_len.max()) if batch else 0
    table = lcs_table(a[:, :n_used], b[:, :m_used], a_len, b_len)
    mask_a_used, mask_b_used = _traceback(table)
    mask_a = torch.zeros(batch, n, dtype=torch.bool, device=a.device)
    mask_b = torch.zeros(batch, m, dtype=torch.bool, device=a.device)
    mask_a[:, :n_used] = mask_a_used
    mask_b[:, :m_used] = mask_b_used
    return LcsResult(length=table[-1, :, -1].long(), mask_a=mask_a, mask_b=mask_b)
