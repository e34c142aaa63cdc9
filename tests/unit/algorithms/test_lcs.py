"""Batched LCS against independent dynamic programmes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from carft_nemo.algorithms.lcs import lcs_masks, lcs_table


def python_lcs_length(x: list[int], y: list[int]) -> int:
    """The textbook O(nm) cell-by-cell DP (independent reference for short pairs)."""
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            if x[i - 1] == y[j - 1]:
                table[i][j] = table[i - 1][j - 1] + 1
            else:
                table[i][j] = max(table[i - 1][j], table[i][j - 1])
    return table[-1][-1]


def numpy_lcs_length(x: np.ndarray, y: np.ndarray) -> int:
    """O(nm) DP vectorised row by row with numpy (the reference for long pairs)."""
    prev = np.zeros(len(y) + 1, dtype=np.int64)
    for token in x:
        cur = np.zeros_like(prev)
        for_match = prev[:-1] + (y == token)
        cur[1:] = np.maximum.accumulate(np.maximum(prev[1:], for_match))
        prev = cur
    return int(prev[-1])


def _pad(seqs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max([len(s) for s in seqs] + [1])
    out = torch.full((len(seqs), width), 7, dtype=torch.long)  # pad value that also occurs as a token
    for k, s in enumerate(seqs):
        out[k, : len(s)] = torch.from_numpy(s)
    return out, torch.tensor([len(s) for s in seqs])


def _random_sequences(
    rng: np.random.Generator, count: int, vocab: int, below_length: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``count`` a-sequences then ``count`` b-sequences, lengths in [0, below_length)."""

    def draw() -> list[np.ndarray]:
        return [rng.integers(0, vocab, rng.integers(0, below_length)) for _ in range(count)]

    seqs_a = draw()
    return seqs_a, draw()


def _check_masks(a, b, a_len, b_len, result) -> None:
    for k in range(a.shape[0]):
        ma, mb = result.mask_a[k], result.mask_b[k]
        assert not ma[a_len[k] :].any() and not mb[b_len[k] :].any()
        assert int(ma.sum()) == int(mb.sum()) == int(result.length[k])
        assert torch.equal(a[k][ma], b[k][mb])  # the selected tokens form one common subsequence


def test_hand_computed_cases():
    def ids(text: str) -> list[int]:
        return [ord(c) for c in text]

    pairs = [
        ("ABCBDAB", "BDCABA", 4),
        ("AGGTAB", "GXTXAYB", 4),
        ("abc", "abc", 3),
        ("abc", "xyz", 0),
        ("", "abc", 0),
        ("", "", 0),
        ("aaaa", "aa", 2),
    ]
    a, a_len = _pad([np.array(ids(p[0]), dtype=np.int64) for p in pairs])
    b, b_len = _pad([np.array(ids(p[1]), dtype=np.int64) for p in pairs])
    result = lcs_masks(a, b, a_len, b_len)
    assert result.length.tolist() == [p[2] for p in pairs]
    _check_masks(a, b, a_len, b_len, result)
    assert result.mask_a[2, :3].all() and result.mask_b[2, :3].all()


def test_matches_python_dp_on_short_pairs():
    seqs_a, seqs_b = _random_sequences(np.random.default_rng(1), 60, 4, 40)
    a, a_len = _pad(seqs_a)
    b, b_len = _pad(seqs_b)
    result = lcs_masks(a, b, a_len, b_len)
    assert result.length.tolist() == [python_lcs_length(x.tolist(), y.tolist()) for x, y in zip(seqs_a, seqs_b)]
    _check_masks(a, b, a_len, b_len, result)


@pytest.mark.parametrize("vocab", [5, 30_000])
def test_matches_reference_dp_on_500_random_pairs(vocab: int):
    """Half of the 1,000 acceptance pairs per vocabulary; lengths 0..600."""
    rng = np.random.default_rng(vocab)
    lengths = rng.integers(0, 601, size=(500, 2))
    seqs_a = [rng.integers(0, vocab, n) for n in lengths[:, 0]]
    seqs_b = [rng.integers(0, vocab, m) for m in lengths[:, 1]]
    if vocab == 30_000:  # random ids of a large vocabulary rarely match: plant shared pieces
        for k in range(0, 500, 2):
            n = min(len(seqs_a[k]), len(seqs_b[k])) // 2
            seqs_b[k][:n] = seqs_a[k][np.sort(rng.choice(len(seqs_a[k]), n, replace=False))]
    order = np.argsort(lengths.max(axis=1))  # similar lengths per chunk keep the padding small
    for chunk in np.array_split(order, 20):
        a, a_len = _pad([seqs_a[k] for k in chunk])
        b, b_len = _pad([seqs_b[k] for k in chunk])
        result = lcs_masks(a, b, a_len, b_len)
        expected = [numpy_lcs_length(seqs_a[k], seqs_b[k]) for k in chunk]
        assert result.length.tolist() == expected
        _check_masks(a, b, a_len, b_len, result)


def test_unpadded_call_and_validation():
    a = torch.tensor([[1, 2, 3, 4]])
    b = torch.tensor([[2, 4, 1]])
    result = lcs_masks(a, b)
    assert result.length.tolist() == [2]
    assert result.mask_a.tolist() == [[False, True, False, True]]
    assert result.mask_b.tolist() == [[True, True, False]]
    with pytest.raises(ValueError):
        lcs_masks(a, b, torch.tensor([5]), None)


def test_lcs_table_matches_python_dp():
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 3, 9), rng.integers(0, 3, 7)
    table = lcs_table(torch.from_numpy(x)[None], torch.from_numpy(y)[None])
    for i in range(len(x) + 1):
        for j in range(len(y) + 1):
            assert int(table[i, 0, j]) == python_lcs_length(x[:i].tolist(), y[:j].tolist())


def test_split_halves_and_orientation():
    """Odd, one-token and swapped (n > m) pairs: the Hirschberg halves meet at the right column."""
    rng = np.random.default_rng(7)
    seqs_a = [rng.integers(0, 3, n) for n in (1, 2, 3, 5, 17, 33, 64, 1, 0, 40)]
    seqs_b = [rng.integers(0, 3, m) for m in (1, 1, 7, 2, 16, 65, 3, 30, 4, 40)]
    for x, y in ((seqs_a, seqs_b), (seqs_b, seqs_a)):
        a, a_len = _pad(x)
        b, b_len = _pad(y)
        result = lcs_masks(a, b, a_len, b_len)
        assert result.length.tolist() == [python_lcs_length(p.tolist(), q.tolist()) for p, q in zip(x, y)]
        _check_masks(a, b, a_len, b_len, result)


def test_cpu_thread_count_is_restored():
    before = torch.get_num_threads()
    lcs_masks(torch.tensor([[1, 2, 3]]), torch.tensor([[3, 2, 1, 2]]))
    assert torch.get_num_threads() == before


def test_torch_loops_match_numpy_loops(monkeypatch):
    """The loops run in numpy on CPU and in torch elsewhere: the torch ones, run on CPU, agree."""
    from carft_nemo.algorithms import lcs as lcs_module

    seqs_a, seqs_b = _random_sequences(np.random.default_rng(5), 12, 6, 260)
    a, a_len = _pad(seqs_a)
    b, b_len = _pad(seqs_b)
    with_numpy = lcs_masks(a, b, a_len, b_len)
    monkeypatch.setattr(lcs_module, "_NUMPY_LOOPS_ON_CPU", False)
    with_torch = lcs_masks(a, b, a_len, b_len)
    assert with_torch.length.tolist() == [numpy_lcs_length(x, y) for x, y in zip(seqs_a, seqs_b)]
    assert torch.equal(with_torch.mask_a, with_numpy.mask_a) and torch.equal(with_torch.mask_b, with_numpy.mask_b)
    _check_masks(a, b, a_len, b_len, with_torch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    seqs_a, seqs_b = _random_sequences(np.random.default_rng(11), 16, 20, 300)
    a, a_len = _pad(seqs_a)
    b, b_len = _pad(seqs_b)
    cpu = lcs_masks(a, b, a_len, b_len)
    gpu = lcs_masks(a.cuda(), b.cuda(), a_len.cuda(), b_len.cuda())
    assert gpu.mask_a.device.type == "cuda"
    assert gpu.length.cpu().tolist() == cpu.length.tolist()
    _check_masks(a, b, a_len, b_len, type(cpu)(gpu.length.cpu(), gpu.mask_a.cpu(), gpu.mask_b.cpu()))


def test_concurrent_threads_and_shrinking_calls_keep_their_answers():
    """CPU scratch buffers are per thread and reused across calls of other sizes."""
    import threading

    rng = np.random.default_rng(11)
    # large then smaller: reused buffers must not leak old words
    jobs = [_random_sequences(rng, 6, 20, size + 1) for size in (300, 40, 180, 7)]
    expected = [[numpy_lcs_length(x, y) for x, y in zip(sa, sb)] for sa, sb in jobs]
    failures: list[str] = []

    def work(order: list[int]) -> None:
        for index in order:
            a, a_len = _pad(jobs[index][0])
            b, b_len = _pad(jobs[index][1])
            result = lcs_masks(a, b, a_len, b_len)
            if result.length.tolist() != expected[index]:
                failures.append(f"job {index}: {result.length.tolist()} != {expected[index]}")
            try:
                _check_masks(a, b, a_len, b_len, result)
            except AssertionError as error:  # a thread's exception would not fail the test
                failures.append(f"job {index}: masks: {error}")

    threads = [threading.Thread(target=work, args=(order,)) for order in ([0, 1, 2, 3] * 3, [3, 2, 1, 0] * 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures
