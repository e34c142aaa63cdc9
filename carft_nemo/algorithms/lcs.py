"""Batched, exact longest common subsequence (LCS) of token sequences, in torch.

CARFT's negative signal splits a wrong on-policy CoT and the annotated CoT of the same
question into their common part (the LCS) and their remainders. The paper code
(``cl.py``) runs a pure-Python O(nm) dynamic programme per pair, once per micro-batch; here
every pair of the batch is solved at once with bit-parallel array operations that run on
CPU and GPU. No Python loop over cells or pairs: for ``n <= m`` (the shorter sequence gives
the rows) there are ``ceil(n / 2) + W - 1`` iterations of 6 small elementwise ops for the
forward pass and as many of 7 for the traceback, each over ``[W, 2B]`` words (``W = ceil(m /
16)``); everything else is a few dozen whole-tensor ops. The cost is per-op dispatch and the
memory traffic of the whole-tensor ops, not the O(B n m / 16) word operations. On CPU the two
loops run as numpy ufuncs on views of the same buffers (``_loop_arrays``): a numpy ufunc with
``out=`` dispatches in about half the time of the torch op; on GPU they are torch ops.

Speed against a straightforward Python O(nm) DP with traceback, and a call's time by part,
are measured by ``python -m benchmarks.contrastive`` (64 pairs of 512 tokens, vocabulary
1,000, 70% shared tokens), results in ``benchmarks/results/contrastive.json``: two orders of
magnitude less CPU time; the two loops dominate a call.

DP (1-based, ``L[0, j] = L[i, 0] = 0``)::

    L[i, j] = L[i-1, j-1] + 1                  if a_i == b_j
            = max(L[i-1, j], L[i, j-1])        otherwise

Hirschberg split. The rows of each pair are cut in half at ``h = len(a) // 2``: the top half
``a[:h]`` runs forward against ``b``, the bottom half runs reversed (``a[h:]`` reversed against
``b`` reversed), both as one batch of ``2B`` problems, so the sequential depth is ``n / 2``
instead of ``n``. The last rows give ``LCS(a[:h], b[:s])`` and ``LCS(a[h:], b[s:])`` for every
split column ``s``; the best ``s`` gives the length, and each half is traced back from it (again
one batch of ``2B``): the top half's LCS ends before ``s``, the bottom half's starts at ``s``.

Forward pass, bit-parallel (Hyyro 2004, "Bit-parallel LCS-length computation revisited",
after Allison & Dix 1986 and Crochemore et al. 2001). Row ``i`` of ``L`` is encoded by an
m-bit vector ``V_i`` whose bit ``j-1`` is 0 exactly where the row steps up,
``L[i, j] = L[i, j-1] + 1``; so ``L[i, j]`` is the number of zeros among bits ``< j``. With
``V_0 = ~0`` and ``M_i`` the bits of the columns where ``b_j == a_i``::

    U = V_{i-1} & M_i
    V_i = (V_{i-1} + U) | (V_{i-1} & ~M_i)                              (Hyyro, eq. 2)

``L[n, m]`` is the number of zeros of ``V_n``. Words hold 16 bits in int32 lanes, so a
word's sum keeps its carry in bit 16 (left in ``V`` as junk: ``U`` and ``K = V & ~M`` are
taken with 16-bit ``M`` and ``~M``, gathered together, which drops it). The multi-word
addition runs as a wavefront: word ``w`` handles row ``i = t - w + 1`` at iteration ``t``,
taking the carry that word ``w-1`` produced for the same row one iteration earlier (inputs
and outputs are stored "skewed": ``X[t, :, w]`` belongs to row ``t - w + 1``). Rows past a
problem's length have no matches and leave ``V`` unchanged; columns past ``b_lengths`` never
match, stay 1 and never carry into real columns (carries only move up).

Traceback without searching. Per row, the update moves each zero of ``V_{i-1}`` down to
the lowest match of the run of ones below it (if any); a zero of ``V_i`` at bit ``p`` whose
bit is 1 in ``V_{i-1}`` ("moved in") is therefore a match ``a_i == b_{p+1}``, and ``L`` is
the same in rows ``i`` and ``i-1`` up to column ``p+1`` when the zero at ``p`` is in both.
Walking back from the highest zero below the split column: at row ``i`` with the path on
zero ``p``, if ``p`` moved in, ``(a_i, b_{p+1})`` joins the LCS and the path jumps to the
highest zero of ``V_{i-1}`` below ``p`` (one level lower); otherwise it stays on ``p`` and goes
up. Each level is collected once, so exactly ``L[h, s]`` pairs are marked, in order.

"The highest zero below ``p``" is a carry too, if the bit order is reversed: in
``R = reverse(V_{i-1})`` it is the lowest zero above ``p'``, and ``R + 2 * onehot(p')``
carries through ones and stops on it, so ``(R + 2 * T) & ~R`` is the new one-hot
position (a carry out of the top word means no zero is left: the path is complete). The
traceback is the same skewed wavefront over the bit-reversed history (each 16-bit word
reversed by one table lookup over the whole history once the forward pass is done), with a one-hot "token" per
problem instead of ``V``: ``T = P & R``; ``P = (P | (R + 2T + carry)) & ~R``. Read backwards,
the forward history is already skewed the way the traceback needs (:func:`_traceback`).

Match words come from one sort of ``token * B + pair`` over both sequences (token classes),
a scatter-add of the column bits per class, one row gather and one skew copy, not from
``n * m`` comparisons.

CPU threads: on CPU the call runs with one intra-op thread (the caller's setting is restored
afterwards). Its loops are chains of small dependent ops and its few whole-tensor ops are
memory-bound; on shared cores the OpenMP pool's wake-ups made the same call several times
slower in CPU time.

Memory: ``[n / 2 + W, W, 2B]`` buffers (int32 match words and their complements, history,
reversed history, traceback record) and the ``[classes, W]`` match table, O(B n m / 16) words:
about 27 MB for 64 pairs of 512 tokens. On CPU they are kept between calls, per thread
(:class:`_Scratch`: re-faulting freshly allocated pages cost more than the computation).

Differences from the paper code (``cl.py``): same DP, but batched and in torch; the paper
ran it on decoded token *strings* of the whole sequence (prompt and padding included), we
run it on token ids of whatever span the caller selects (the contrastive module passes
CoT tokens only, see ``carft_nemo.algorithms.contrastive.lcs_spans``). Among several LCSs
the two tracebacks may pick different (equally long) ones.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy
import torch
from torch import Tensor

__all__ = ["LcsResult", "lcs_masks", "lcs_table"]

_BITS = 16  # payload bits per int32 lane; bit 16 is where a lane's carry lands
_FULL = (1 << _BITS) - 1
_SHIFT = 4  # log2(_BITS)


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
# A row of a problem is W = ceil(m / 16) int32 lanes, stored [W, P] for P problems: lane x holds
# columns 16 (W-1-x) .. 16 (W-1-x) + 15, highest word first. The forward carry then moves from
# lane x+1 to lane x, and the bit-reversed row the traceback needs is the same lanes with each
# 16-bit word reversed (one table lookup): no reordering anywhere.
#
# Both loops run a fixed list of out= / in-place ops on preallocated [W, P] blocks and views made
# before the loop (no allocation per step; 0-dim array constants instead of Python scalars, which
# cost a conversion per call): each op costs 1.5-4 microseconds of dispatch, which is the run time.


class _Constants:
    """Per-device constants: the 17-bit reversal table and 0-dim operands for the loops."""

    def __init__(self, device: torch.device) -> None:
        word = torch.arange(1 << (_BITS + 1), device=device) & _FULL  # bit 16 (a carry left in V) is ignored
        bits = (word[:, None] >> torch.arange(_BITS, device=device)) & 1
        self.reverse = (bits << torch.arange(_BITS - 1, -1, -1, device=device)).sum(1).to(torch.int32)
        self.shift = torch.tensor(_BITS, dtype=torch.int32, device=device)
        self.full = torch.tensor(_FULL, dtype=torch.int32, device=device)


_CONSTANTS: dict[torch.device, _Constants] = {}


def _constants(device: torch.device) -> _Constants:
    if device not in _CONSTANTS:
        _CONSTANTS[device] = _Constants(device)
    return _CONSTANTS[device]


class _Scratch(threading.local):
    """Per-thread int32 buffers kept between calls on CPU, one per slot, grown on demand.

    Why: the big buffers (match table, match words, history, traceback record: ~27 MB for 64
    pairs of 512 tokens) are freed back to the OS after each call by the C allocator, and
    faulting them in again cost more than the computation (9,000 page faults, a third of the
    CPU time, per call on the benchmark host). CUDA's caching allocator already reuses memory.
    """

    def __init__(self) -> None:
        self.buffers: dict[str, Tensor] = {}

    def take(self, slot: str, shape: tuple[int, ...], device: torch.device) -> Tensor:
        if device.type != "cpu":
            return torch.empty(shape, dtype=torch.int32, device=device)
        numel = math.prod(shape)
        buffer = self.buffers.get(slot)
        if buffer is None or buffer.numel() < numel:
            buffer = self.buffers[slot] = torch.empty(numel, dtype=torch.int32)
        return buffer[:numel].view(shape)


_SCRATCH = _Scratch()
_NUMPY_LOOPS_ON_CPU = True  # False runs the torch loops (the CUDA path) on CPU: for tests


def _loop_arrays(*tensors: Tensor) -> tuple[object, object, list]:
    """``(xp, shift, arrays)`` for the two loops: numpy views of the tensors on CPU, else torch.

    Why numpy on CPU: the loops are chains of ~3,500 small dependent elementwise ops, and a
    numpy ufunc with ``out=`` dispatches in about half the time of the same torch op (1.9 us
    against 4.2 us for ``[32, 128]`` int32 on the benchmark host). The views share memory
    with the tensors, so results land in them. Both modules spell the ops the same way.
    """
    if tensors[0].device.type == "cpu" and _NUMPY_LOOPS_ON_CPU:
        return numpy, numpy.array(_BITS, dtype=numpy.int32), [t.numpy() for t in tensors]
    return torch, _constants(tensors[0].device).shift, list(tensors)


def _token_classes(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, int]:
    """Per-pair token classes: ``(a_class [B, n], b_class [B, m], classes)``.

    Equal tokens of the same pair share a class; classes are dense over the batch. One
    sort of ``token * B + pair`` over both sequences (int32 keys when they fit, which sort
    faster), no ``n * m`` comparison.
    """
    batch, n = a.shape
    m = b.shape[1]
    low = int(torch.minimum(a.min(), b.min()))
    span = int(torch.maximum(a.max(), b.max())) - low + 1
    key_type = torch.int32 if span * batch < 2**31 else torch.long
    pair = torch.arange(batch, device=a.device)[:, None]
    keys = torch.cat([((b.long() - low) * batch + pair).flatten(), ((a.long() - low) * batch + pair).flatten()]).to(
        key_type
    )
    sorted_keys, order = keys.sort()  # equal keys share a class: their order does not matter
    new_run = torch.ones_like(sorted_keys, dtype=torch.long)
    torch.ne(sorted_keys[1:], sorted_keys[:-1], out=new_run[1:])
    run = new_run.cumsum_(0).sub_(1)
    classes = int(run[-1]) + 1
    run_of = torch.empty_like(run).scatter_(0, order, run)
    return run_of[batch * m :].view(batch, n), run_of[: batch * m].view(batch, m), classes


def _match_words(table: Tensor, row_class: Tensor) -> Tensor:
    """Match words and their complements in wavefront order, ``[2, n + W - 1, W, P]`` int32.

    ``table [C, W]`` holds the match words of each class (lanes highest word first);
    ``row_class [P, n]`` the class of every row (padding: the zero last row of ``table``).
    Entry ``[0, t, x, k]`` is lane ``x`` of ``M`` for row ``t + x - (W-1)`` of problem ``k``
    (zero outside the rows), entry ``[1, t, x, k]`` the same lane of ``~M`` (16 bits). One row
    gather in row-major order ``[rows, P, W]``, then the skew: step ``t`` reads the ``W``
    consecutive ``[P, W]`` blocks from row ``t`` on, which the steps before it read too, so
    the copy runs from cache. Step ``t`` of :func:`_forward` reads two contiguous ``[W, P]`` blocks.
    """
    problems, n = row_class.shape
    classes, words = table.shape
    steps = n + words - 1
    padded = torch.nn.functional.pad(row_class, (words - 1, words - 1), value=classes - 1).t().flatten()
    gathered = torch.index_select(
        table, 0, padded, out=_SCRATCH.take("per_step", (padded.numel(), words), table.device)
    )
    block = problems * words
    out = _SCRATCH.take("pair", (2, steps, words, problems), table.device)
    out[0] = gathered.as_strided((steps, words, problems), (block, block + 1, words))
    torch.bitwise_xor(out[0], _FULL, out=out[1])
    return out


def _forward(matches: Tensor) -> Tensor:
    """Hyyro's recurrence over all rows as a wavefront; returns the history ``[steps + 1, W, P]`` int32.

    At step ``t`` lane ``x`` (word ``W-1-x``) processes row ``t + x - (W-1)``; entry ``t + 1``
    receives step ``t``'s output (bit 16 of every lane is junk: a carry), entry 0 is ``V_0``
    (all ones). The last entry holds every problem's last row.
    """
    _, steps, words, problems = matches.shape
    device = matches.device
    history = _SCRATCH.take("history", (steps + 1, words, problems), device)
    history[0] = _FULL
    xp, shift, (history_, matches_, parts, total, carry) = _loop_arrays(
        history,
        matches,
        torch.empty(2, words, problems, dtype=torch.int32, device=device),
        torch.empty(words, problems, dtype=torch.int32, device=device),
        torch.zeros(words + 1, problems, dtype=torch.int32, device=device),
    )
    used, kept = parts[0], parts[1]
    carry_in, carry_out = carry[1:], carry[:-1]  # lane x reads lane x+1 (the word below)
    rows = list(history_)
    for match, v, v_next in zip(matches_.swapaxes(0, 1), rows[:-1], rows[1:]):
        xp.bitwise_and(v, match, out=parts)  # U = V & M, K = V & ~M (V's junk bit 16 drops)
        xp.add(kept, used, out=total)
        xp.add(total, used, out=total)  # K + 2U = V + U
        xp.add(total, carry_in, out=total)  # + carry from the word below
        xp.bitwise_right_shift(total, shift, out=carry_out)
        xp.bitwise_or(total, kept, out=v_next)  # Hyyro eq. 2 (bit 16 keeps the carry: ignored)
    return history


def _traceback(history: Tensor, token: Tensor) -> tuple[Tensor, Tensor]:
    """Rows ``[P, n]`` (bool) and reversed-domain column words ``[P, W]`` of one LCS per problem.

    ``history``: :func:`_forward`'s output; ``token [W, P]``: one-hot reversed-domain start
    position per problem (zero: empty LCS), on a zero of the last row. Walks the
    bit-reversed history backwards: at iteration ``k`` every lane reads entry ``k``; lane
    ``x`` handles row ``k + x - W + 2`` (1-based), so a carry leaving lane ``x`` reaches lane
    ``x+1`` exactly when that lane handles the same row.
    """
    entries, words, problems = history.shape
    n = entries - words
    device = history.device
    consts = _constants(device)
    reversed_both = _SCRATCH.take("pair", (2, entries, words, problems), device)  # the match words are done
    ones_all, zeros_all = reversed_both.unbind(0)
    torch.index_select(consts.reverse, 0, history.flatten(), out=ones_all.view(-1))  # R = reverse(V), all rows
    torch.bitwise_xor(ones_all, consts.full, out=zeros_all)
    taken = _SCRATCH.take("per_step", (entries - 1, words, problems), device)  # T of every step
    xp, shift, (ones_all_, zeros_all_, taken_, token_, total, carry) = _loop_arrays(
        ones_all,
        zeros_all,
        taken,
        token,
        torch.empty(words, problems, dtype=torch.int32, device=device),
        torch.zeros(words + 1, problems, dtype=torch.int32, device=device),
    )
    carry_in, carry_out = carry[:-1], carry[1:]  # lane x reads lane x-1 (reversed: the word above)
    for ones, zeros, match in zip(
        reversed(list(ones_all_)[:-1]), reversed(list(zeros_all_)[:-1]), reversed(list(taken_))
    ):
        xp.bitwise_and(token_, ones, out=match)  # T: the token's zero moved in: a match
        xp.add(ones, match, out=total)
        xp.add(total, match, out=total)  # R + 2T (+ carry) runs to the next zero
        xp.add(total, carry_in, out=total)
        xp.bitwise_right_shift(total, shift, out=carry_out)
        xp.bitwise_or(token_, total, out=token_)
        xp.bitwise_and(token_, zeros, out=token_)  # drop T, keep the landing bit
    # Step k, lane x matched row k + x - (W-1) (0-based); with lanes flipped (x' = W-1-x) that is
    # step k = row + x': a strided view [n, W, P] of every row's W candidate lanes, P innermost.
    plane = words * problems
    candidates = taken.as_strided((n, words, problems), (plane, plane - problems, 1), (words - 1) * problems)
    rows = candidates.amax(1) != 0  # T >= 0: one-hot words
    return rows.t(), taken.sum(0, dtype=torch.int32).t()  # each column is taken once: + is |


def _bits(words: Tensor, m: int) -> Tensor:
    """Words ``[P, W]`` (highest word first) -> ``[P, m]`` 0/1 int32 in column order."""
    shifts = torch.arange(_BITS, device=words.device, dtype=torch.int32)
    return ((words.flip(1)[:, :, None] >> shifts) & 1).flatten(1)[:, :m]


def _reversed_bits(words: Tensor, m: int) -> Tensor:
    """Reversed-domain words ``[P, W]`` -> ``[P, m]`` 0/1 int32 in (unreversed) column order."""
    shifts = torch.arange(_BITS, device=words.device, dtype=torch.int32)
    bits = ((words[:, :, None] >> shifts) & 1).flatten(1)  # bit g = 16 x + q is column 16 W - 1 - g
    return bits.flip(1)[:, :m]


def _bit_table(b_class: Tensor, positions: Tensor, valid: Tensor, classes: int, words: int) -> Tensor:
    """``[classes + 1, W]`` match words: bit ``positions[k, j]`` set in row ``b_class[k, j]``."""
    # positions >= 0: shifts and masks instead of // and % (integer division is slow on CPU)
    bit = torch.where(valid, torch.bitwise_left_shift(1, positions & (_BITS - 1)), 0).to(torch.int32)
    lane = words - 1 - (positions >> _SHIFT)
    table = _SCRATCH.take("table", (words * (classes + 1),), b_class.device).zero_()
    table.scatter_add_(0, (b_class * words + lane).flatten(), bit.flatten())  # distinct bits: + is |
    return table.view(classes + 1, words)


def _last_row_zeros(a: Tensor, b: Tensor, a_len: Tensor, b_len: Tensor) -> Tensor:
    """Zero bits of ``V_n`` per pair, ``[B, m]`` (1 where the last DP row steps up)."""
    m = b.shape[1]
    words = -(-m // _BITS)
    a_class, b_class, classes = _token_classes(a, b)
    j = torch.arange(m, device=b.device)
    table = _bit_table(b_class, j.expand_as(b_class), j < b_len[:, None], classes, words)
    row_class = torch.where(torch.arange(a.shape[1], device=a.device) < a_len[:, None], a_class, classes)
    return 1 - _bits(_forward(_match_words(table, row_class))[-1].t(), m)


def _solve(a: Tensor, b: Tensor, a_len: Tensor, b_len: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Length ``[B]``, ``mask_a [B, n]``, ``mask_b [B, m]`` for trimmed inputs (module docstring).

    The rows of ``a`` are split in two halves; the top half runs forward against ``b``, the
    bottom half reversed against reversed ``b``, as one batch of ``2B`` problems. The best
    split column, then one traceback per half, again as one batch.
    """
    batch, n = a.shape
    m = b.shape[1]
    device = a.device
    words = -(-m // _BITS)
    top_len = a_len >> 1
    bottom_len = a_len - top_len
    half = int(bottom_len.max())
    a_class, b_class, classes = _token_classes(a, b)
    # One table for both halves: the bottom half's columns are b reversed, b_len - 1 - j.
    j = torch.arange(m, device=device)
    valid = j < b_len[:, None]
    table = _bit_table(
        torch.cat([b_class, b_class + classes]),
        torch.cat([j.expand_as(b_class), (b_len[:, None] - 1 - j).clamp(min=0)]),
        torch.cat([valid, valid]),
        2 * classes,
        words,
    )
    i = torch.arange(half, device=device)
    none = 2 * classes  # the zero row
    top_rows = torch.where(i < top_len[:, None], a_class.gather(1, i.clamp(max=n - 1).expand(batch, -1)), none)
    bottom_rows = torch.where(
        i < bottom_len[:, None], a_class.gather(1, (a_len[:, None] - 1 - i).clamp(min=0)) + classes, none
    )
    history = _forward(_match_words(table, torch.cat([top_rows, bottom_rows])))
    zeros = 1 - _bits(history[-1].t(), m)  # [2B, m]
    # LCS(a_top, b[:s]) + LCS(a_bottom, b[s:]) for every split column s = 0..b_len (Hirschberg).
    prefix = torch.nn.functional.pad(zeros.cumsum(1), (1, 0))  # [2B, m + 1]
    s = torch.arange(m + 1, device=device)
    score = prefix[:batch] + prefix[batch:].gather(1, (b_len[:, None] - s).clamp(min=0))
    score = torch.where(s <= b_len[:, None], score, -1)
    length, split = score.max(1)
    # Start of each traceback: the highest zero of its last row below its split column.
    limit = torch.cat([split, b_len - split])[:, None]
    below = (zeros > 0) & (j < limit)
    start = torch.where(below, j + 1, 0).amax(1) - 1  # -1: no zero, empty half
    position = _BITS * words - 1 - start  # reversed-domain bit
    lanes = torch.arange(words, device=device)
    token = torch.where(
        (lanes == position[:, None] >> _SHIFT) & (start[:, None] >= 0),
        torch.bitwise_left_shift(1, position[:, None] & (_BITS - 1)),
        0,
    ).to(torch.int32)
    matched_rows, columns = _traceback(history, token.t().contiguous())
    matched_cols = _reversed_bits(columns, m) != 0  # [2B, m]
    # Back to the pair's coordinates: the bottom half counts rows and columns from the end.
    ia = torch.arange(n, device=device)
    in_top = ia < top_len[:, None]
    from_top = matched_rows[:batch].gather(1, ia.clamp(max=half - 1).expand(batch, -1))
    from_bottom = matched_rows[batch:].gather(1, (a_len[:, None] - 1 - ia).clamp(0, half - 1))
    mask_a = torch.where(in_top, from_top, from_bottom & (ia < a_len[:, None]))
    mirrored = matched_cols[batch:].gather(1, (b_len[:, None] - 1 - j).clamp(min=0)) & (j < b_len[:, None])
    mask_b = matched_cols[:batch] | mirrored
    return length, mask_a, mask_b


def lcs_table(a: Tensor, b: Tensor, a_lengths: Tensor | None = None, b_lengths: Tensor | None = None) -> Tensor:
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
            table[i, :, 1:] = _last_row_zeros(a[:, :i], b, a_len.clamp(max=i), b_len).cumsum(-1)
    return table


def lcs_masks(a: Tensor, b: Tensor, a_lengths: Tensor | None = None, b_lengths: Tensor | None = None) -> LcsResult:
    """Exact LCS of each pair ``(a[k, :a_lengths[k]], b[k, :b_lengths[k]])`` with membership masks.

    Args:
        a: ``[B, n]`` integer token ids (right-padded; padding values are ignored).
        b: ``[B, m]`` integer token ids.
        a_lengths, b_lengths: ``[B]`` numbers of real tokens; ``None`` = the full width.

    Returns:
        :class:`LcsResult` with ``length [B]`` and masks ``[B, n]`` / ``[B, m]``, false on
        padding. Work: O(B n m / 16) word ops in about ``min(n, m) + max(n, m) / 8`` Python
        iterations of 6-7 small elementwise ops each; memory O(B n m / 16) words. On CPU it runs
        with one intra-op thread (restored afterwards; module docstring).
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
    threads = torch.get_num_threads()
    if a.device.type == "cpu":
        torch.set_num_threads(1)  # why: see the module docstring (CPU threads)
    try:
        if n_used <= m_used:  # iterations follow the rows (a), words the columns (b): loop over the shorter
            length, mask_a[:, :n_used], mask_b[:, :m_used] = _solve(a[:, :n_used], b[:, :m_used], a_len, b_len)
        else:
            length, mask_b[:, :m_used], mask_a[:, :n_used] = _solve(b[:, :m_used], a[:, :n_used], b_len, a_len)
    finally:
        torch.set_num_threads(threads)
    return LcsResult(length=length, mask_a=mask_a, mask_b=mask_b)
