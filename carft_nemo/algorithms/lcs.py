"""Batched, exact longest common subsequence (LCS) of token sequences, in torch.

CARFT's negative signal splits a wrong on-policy CoT and the annotated CoT of the same
question into their common part (the LCS) and their remainders. The paper code
(``cl.py``) runs a pure-Python O(nm) dynamic programme per pair, once per micro-batch; here
every pair of the batch is solved at once with bit-parallel tensor operations that run on
CPU and GPU. No Python loop over cells or pairs: ``n + W`` iterations of 8 small tensor ops
for the forward pass and as many for the traceback, each over ``[B, W]`` words
(``W = ceil(m / 16)``; the shorter sequence gives the rows); everything else is a handful of
whole-tensor ops. On CPU the cost is dominated by per-op dispatch (~5-10 us per op on a
loaded host), not by the O(B n m / 16) word operations.

DP (1-based, ``L[0, j] = L[i, 0] = 0``)::

    L[i, j] = L[i-1, j-1] + 1                  if a_i == b_j
            = max(L[i-1, j], L[i, j-1])        otherwise

Forward pass, bit-parallel (Hyyro 2004, "Bit-parallel LCS-length computation revisited",
after Allison & Dix 1986 and Crochemore et al. 2001). Row ``i`` of ``L`` is encoded by an
m-bit vector ``V_i`` whose bit ``j-1`` is 0 exactly where the row steps up,
``L[i, j] = L[i, j-1] + 1``; so ``L[i, j]`` is the number of zeros among bits ``< j``. With
``V_0 = ~0`` and ``M_i`` the bits of the columns where ``b_j == a_i``::

    U = V_{i-1} & M_i
    V_i = (V_{i-1} + U) | (V_{i-1} & ~M_i)                              (Hyyro, eq. 2)

``L[n, m]`` is the number of zeros of ``V_n``. Words hold 16 bits in int64 lanes, so a
word's sum keeps its carry in bit 16. The multi-word addition runs as a wavefront: word
``w`` handles row ``i = t - w + 1`` at iteration ``t``, taking the carry that word ``w-1``
produced for the same row one iteration earlier (inputs and outputs are stored
"skewed": ``X[t, :, w]`` belongs to row ``t - w + 1``). Rows past ``a_lengths`` have no
matches and leave ``V`` unchanged; columns past ``b_lengths`` never match, stay 1 and
never carry into real columns (carries only move up).

Traceback without searching. Per row, the update moves each zero of ``V_{i-1}`` down to
the lowest match of the run of ones below it (if any); a zero of ``V_i`` at bit ``p`` whose
bit is 1 in ``V_{i-1}`` ("moved in") is therefore a match ``a_i == b_{p+1}``, and ``L`` is
the same in rows ``i`` and ``i-1`` up to column ``p+1`` when the zero at ``p`` is in both.
Walking back from the highest zero of ``V_n``: at row ``i`` with the path on zero ``p``,
if ``p`` moved in, ``(a_i, b_{p+1})`` joins the LCS and the path jumps to the highest
zero of ``V_{i-1}`` below ``p`` (one level lower); otherwise it stays on ``p`` and goes
up. Each level is collected once, so exactly ``L[n, m]`` pairs are marked, in order.

"The highest zero below ``p``" is a carry too, if the bit order is reversed: in
``R = reverse(V_{i-1})`` it is the lowest zero above ``p'``, and ``R + 2 * onehot(p')``
carries through ones and stops on it, so ``(R + 2 * T) & ~R`` is the new one-hot
position (a carry out of the top word means no zero is left: the path is complete). The
traceback is the same skewed wavefront over the bit-reversed history (each 16-bit word
reversed by one table lookup as the forward pass stores it), with a one-hot "token" per
pair instead of ``V``: ``T = P & R``; ``P = (P | (R + 2T + carry)) & ~R``. Read backwards,
the forward history is already skewed the way the traceback needs (module code,
:func:`_traceback`).

Memory: ``[n + W, B, W]`` buffers (int64 match words, int32 history), O(B n m / 16) words
(about 9 MB and 4 MB for 64 pairs of 512 tokens).

Differences from the paper code (``cl.py``): same DP, but batched and in torch; the paper
ran it on decoded token *strings* of the whole sequence (prompt and padding included), we
run it on token ids of whatever span the caller selects (the contrastive module passes
CoT tokens only, see ``carft_nemo.algorithms.contrastive.lcs_spans``). Among several LCSs
the two tracebacks may pick different (equally long) ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LcsResult", "lcs_masks", "lcs_table"]

_BITS = 16  # payload bits per int64 lane: bit 16 holds a word's carry; 16-bit reversal is one lookup
_FULL = (1 << _BITS) - 1


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


def _check_pair(a: Tensor, b: Tensor) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"expected a [B, n] and b [B, m], got {tuple(a.shape)} and {tuple(b.shape)}")


# --- packed bit vectors --------------------------------------------------------------------------
#
# Words are stored highest first: lane x holds bits 16 (W-1-x) .. 16 (W-1-x) + 15 of a row. The
# forward carry then moves from lane x+1 to lane x, and the bit-reversed row of the traceback is
# the same lanes with each 16-bit word reversed (one table lookup): no reordering anywhere.
#
# Both loops run a fixed list of out= ops into preallocated [B, W] buffers (no allocation per
# step). Whole-tensor ops are kept to the few that build the match words: on a CPU whose cores
# are shared, each op over more than 32k elements wakes the intra-op thread pool (milliseconds).


def _reversal_table(device: torch.device) -> Tensor:
    """``[2^16]``: every 16-bit word with its bits in reverse order."""
    table = _REVERSED.get(device)
    if table is None:
        bits = (torch.arange(1 << _BITS, device=device)[:, None] >> torch.arange(_BITS, device=device)) & 1
        table = _REVERSED[device] = (bits << torch.arange(_BITS - 1, -1, -1, device=device)).sum(1).int()
    return table


_REVERSED: dict[torch.device, Tensor] = {}


def _match_table(a: Tensor, b: Tensor, a_len: Tensor, b_len: Tensor, words: int) -> tuple[Tensor, Tensor]:
    """Match words per distinct token of ``b`` and the token class of every row of ``a``.

    Returns ``table [B, m+1, W]`` (lanes highest word first; row ``m`` is all zeros) and
    ``row_class [B, n]`` with ``table[k, row_class[k, i]]`` = the columns where
    ``b[k, j] == a[k, i]``. Built with one sort and one scatter-add over ``b`` instead of
    comparing all ``n * m`` pairs; padding never matches (its bits and rows are zero).
    """
    batch, n = a.shape
    m = b.shape[1]
    pos = torch.arange(m, device=b.device)
    bit = torch.where(pos < b_len[:, None], 1 << (pos % _BITS), 0)  # [B, m]
    lane = words - 1 - pos // _BITS
    sorted_b, order = b.sort(dim=1)
    token_class = torch.searchsorted(sorted_b, sorted_b)  # first index of each run of equal ids
    table = torch.zeros(batch, (m + 1) * words, dtype=torch.long, device=b.device)
    table.scatter_add_(1, token_class * words + lane.gather(0, order.flatten()).view(batch, m),
                       bit.gather(1, order))  # distinct bits: + is |
    a = a.to(b.dtype)
    slot = torch.searchsorted(sorted_b, a.contiguous()).clamp_(max=m - 1)  # [B, n]
    found = (sorted_b.gather(1, slot) == a) & (torch.arange(n, device=a.device) < a_len[:, None])
    return table.view(batch, m + 1, words), torch.where(found, slot, m)


def _forward(table: Tensor, row_class: Tensor, words: int) -> tuple[Tensor, Tensor]:
    """Hyyro's recurrence over all rows as a wavefront; returns ``V_n`` and the reversed history.

    At step ``t`` lane ``x`` (word ``w = W-1-x``) processes row ``t - w``. Returns
    ``v [B, W]`` (``V_n``) and ``reversed [n + W, B, W]``: entry ``t + 1`` holds the
    bit-reversed words of step ``t``'s output (entry 0: ``V_0``, all ones).
    """
    batch, n = row_class.shape
    m = table.shape[1] - 1
    steps = n + words - 1
    device = table.device
    # Match words in step order (lane x at step t: row t + x - (W-1); rows outside 0..n-1 use the
    # zero class m), gathered once so each step reads one contiguous [B, W] block.
    padded = torch.full((batch, n + 2 * words - 2), m, dtype=torch.long, device=device)
    padded[:, words - 1:words - 1 + n] = row_class
    lanes = torch.arange(words, device=device)
    offsets = (padded + torch.arange(batch, device=device)[:, None] * (m + 1)) * words
    index = offsets.unfold(1, words, 1).transpose(0, 1) + lanes  # [steps, B, W]
    matches = table.take(index).unbind(0)
    reverse = _reversal_table(device)
    # int32 halves the memory the loop first touches (page faults are a large share of its cost).
    history = torch.empty(steps + 1, batch, words, dtype=torch.int32, device=device)
    history[0] = _FULL
    used = torch.empty(batch, words, dtype=torch.long, device=device)
    kept = torch.empty_like(used)
    total = torch.empty_like(used)
    carry = torch.zeros(batch, words + 1, dtype=torch.long, device=device)
    carry_in, carry_out = carry[:, 1:], carry[:, :-1]  # lane x reads lane x+1 (the word below)
    v = torch.full((batch, words), _FULL, dtype=torch.long, device=device)
    for match, out in zip(matches, history[1:].unbind(0)):
        torch.bitwise_and(v, match, out=used)             # U = V & M
        torch.sub(v, used, out=kept)                      # V & ~M
        torch.add(v, used, out=total)                     # V + U (+ carry below)
        total.add_(carry_in)
        torch.bitwise_right_shift(total, _BITS, out=carry_out)
        total.bitwise_and_(_FULL)
        torch.bitwise_or(total, kept, out=v)              # Hyyro eq. 2
        torch.take(reverse, v, out=out)                   # reversed words for the traceback
    return v, history


def _traceback(history: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Rows ``[B, n]`` and reversed-domain column words ``[B, W]`` of one LCS (module docstring).

    Walks :func:`_forward`'s history backwards: lane ``x`` handles path step ``u`` (row
    ``n - u + 1``) at iteration ``u + x``, which reads history entry ``n + W - 1 - u - x``
    for all lanes alike. Step 0 only places the token on the highest zero of ``V_n``.
    """
    steps, batch, words = history.shape
    device = history.device
    token = torch.zeros(batch, words, dtype=torch.long, device=device)
    taken = torch.empty_like(token)
    zeros = torch.empty_like(token)
    total = torch.empty_like(token)
    columns = torch.zeros_like(token)
    # rows[:, i + W - 2] collects the token taken on row i; lane x of entry k adds to column k + x.
    rows = torch.zeros(batch, steps + words - 1, dtype=torch.long, device=device)
    row_views = rows.unfold(1, words, 1).unbind(1)
    carry = torch.zeros(batch, words + 1, dtype=torch.long, device=device)
    carry_in, carry_out = carry[:, :-1], carry[:, 1:]  # lane x reads lane x-1 (reversed: the word above)
    carry[:, 0] = 1  # step 0: carry from bit -1 stops on the first zero of reverse(V_n)
    rows_at = history.unbind(0)
    for k in range(steps - 1, -1, -1):
        ones = rows_at[k]
        torch.bitwise_xor(ones, _FULL, out=zeros)
        torch.bitwise_and(token, ones, out=taken)         # T: the token's zero moved in: a match
        torch.add(ones, taken, alpha=2, out=total)        # R + 2T (+ carry) runs to the next zero
        total.add_(carry_in)
        torch.bitwise_right_shift(total, _BITS, out=carry_out)
        token.bitwise_or_(total).bitwise_and_(zeros)      # drop T, keep the landing bit
        row_views[k].add_(taken)
        columns.add_(taken)
        if k == steps - 1:
            carry[:, 0] = 0
    return rows[:, words - 1:words - 1 + n] != 0, columns


def _bits(x: Tensor) -> Tensor:
    """``[B, W]`` words -> ``[B, 16 W]`` 0/1 ints, lowest bit of word 0 first."""
    return ((x[..., None] >> torch.arange(_BITS, device=x.device)) & 1).flatten(-2)


def _solve(a: Tensor, b: Tensor, a_len: Tensor, b_len: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Forward pass and traceback on unpadded-width inputs: length, mask_a, mask_b, ``V_n`` bits."""
    m = b.shape[1]
    words = -(-m // _BITS)
    table, row_class = _match_table(a, b, a_len, b_len, words)
    v, history = _forward(table, row_class, words)
    mask_a, columns = _traceback(history, a.shape[1])
    v_bits = _bits(v.flip(-1))[:, :m]
    length = (1 - v_bits).sum(-1)  # L[n, m] = zeros of V_n (padding bits stay 1)
    return length, mask_a, _bits(columns).flip(-1)[:, :m] != 0, v_bits


def lcs_table(a: Tensor, b: Tensor, a_lengths: Tensor | None = None,
              b_lengths: Tensor | None = None) -> Tensor:
    """The LCS dynamic-programming table of each pair, ``L[i, k, j]``, shape ``[n+1, B, m+1]``.

    Decoded from the bit-parallel rows: ``L[i, j]`` is the number of zero bits below ``j``
    in ``V_i`` (module docstring). One forward pass per prefix of ``a``: for tests and
    inspection only.
    """
    _check_pair(a, b)
    batch, n = a.shape
    m = b.shape[1]
    a_len = _lengths_or_full(a, a_lengths)
    b_len = _lengths_or_full(b, b_lengths)
    table = torch.zeros(n + 1, batch, m + 1, dtype=torch.long, device=a.device)
    if m:
        for i in range(1, n + 1):
            v_bits = _solve(a[:, :i], b, a_len.clamp(max=i), b_len)[3]
            table[i, :, 1:] = (1 - v_bits).cumsum(-1)
    return table


def lcs_masks(a: Tensor, b: Tensor, a_lengths: Tensor | None = None,
              b_lengths: Tensor | None = None) -> LcsResult:
    """Exact LCS of each pair ``(a[k, :a_lengths[k]], b[k, :b_lengths[k]])`` with membership masks.

    Args:
        a: ``[B, n]`` integer token ids (right-padded; padding values are ignored).
        b: ``[B, m]`` integer token ids.
        a_lengths, b_lengths: ``[B]`` numbers of real tokens; ``None`` = the full width.

    Returns:
        :class:`LcsResult` with ``length [B]`` and masks ``[B, n]`` / ``[B, m]``, false on
        padding. Work: O(B n m / 16) word ops in 2 (min(n, m) + max(n, m) / 16) Python
        iterations of 8 small tensor ops each; memory O(B n m / 16) words.
    """
    _check_pair(a, b)
    a_len = _lengths_or_full(a, a_lengths)
    b_len = _lengths_or_full(b, b_lengths)
    batch, n = a.shape
    m = b.shape[1]
    mask_a = torch.zeros(batch, n, dtype=torch.bool, device=a.device)
    mask_b = torch.zeros(batch, m, dtype=torch.bool, device=a.device)
    # Trim shared padding so the work only covers the longest real sequences.
    n_used = int(a_len.max()) if batch else 0
    m_used = int(b_len.max()) if batch else 0
    if n_used == 0 or m_used == 0:
        return LcsResult(length=torch.zeros(batch, dtype=torch.long, device=a.device), mask_a=mask_a, mask_b=mask_b)
    if n_used <= m_used:  # iterations follow the rows (a), words the columns (b): loop over the shorter
        length, mask_a[:, :n_used], mask_b[:, :m_used], _ = _solve(a[:, :n_used], b[:, :m_used], a_len, b_len)
    else:
        length, mask_b[:, :m_used], mask_a[:, :n_used], _ = _solve(b[:, :m_used], a[:, :n_used], b_len, a_len)
    return LcsResult(length=length, mask_a=mask_a, mask_b=mask_b)
