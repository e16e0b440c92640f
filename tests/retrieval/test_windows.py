"""Sliding training windows: left padding, where windows end, and label coverage."""

import numpy as np
import pytest

from llamarec.retrieval.windows import training_windows


def arr(*items: int) -> np.ndarray:
    return np.array(items, dtype=np.int64)


def test_short_sequence_gives_one_left_padded_window():
    out = training_windows([arr(4, 5, 6)], max_len=5, step=5)
    assert out.dtype == np.int64
    assert out.tolist() == [[0, 0, 0, 4, 5, 6]]


def test_sequence_of_exactly_one_window_has_no_padding():
    out = training_windows([arr(1, 2, 3, 4, 5)], max_len=4, step=2)
    assert out.tolist() == [[1, 2, 3, 4, 5]]


def test_long_sequence_windows_end_every_step_from_the_last_item():
    seq = np.arange(1, 13)  # 12 items, windows of 5 (4 inputs + next-item labels)
    out = training_windows([seq], max_len=4, step=3)
    # ends at item 12, 9, 6, then the earliest window starts at item 1
    assert out.tolist() == [
        [8, 9, 10, 11, 12],
        [5, 6, 7, 8, 9],
        [2, 3, 4, 5, 6],
        [1, 2, 3, 4, 5],
    ]


def test_end_exactly_at_the_first_window_is_not_repeated():
    seq = np.arange(1, 10)  # 9 items, width 5, step 4: ends 9 and 5, and 5 is the first window
    out = training_windows([seq], max_len=4, step=4)
    assert out.tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 4, 5]]


def test_sequences_shorter_than_two_are_skipped():
    out = training_windows([arr(), arr(7), arr(1, 2)], max_len=3, step=3)
    assert out.tolist() == [[0, 0, 1, 2]]
    empty = training_windows([arr(7)], max_len=3, step=3)
    assert empty.shape == (0, 4) and empty.dtype == np.int64


@pytest.mark.parametrize("max_len,step", [(4, 1), (4, 3), (4, 4), (6, 5), (10, 10), (3, 2)])
def test_every_item_but_the_first_is_a_label(max_len, step):
    rng = np.random.default_rng(max_len * 10 + step)
    seqs = [rng.permutation(np.arange(1, 100))[:n] for n in (2, 3, max_len, max_len + 1, max_len + 2,
                                                            17, 31, 40)]
    out = training_windows(seqs, max_len, step)
    width = max_len + 1
    assert out.shape[1] == width
    row = 0
    for seq in seqs:
        n_windows = 1 if len(seq) <= width else len(range(len(seq), width, -step)) + 1
        windows = out[row:row + n_windows]
        row += n_windows
        # the first window ends at the last item; the last starts at the first item
        assert windows[0][-1] == seq[-1]
        real = windows[-1][windows[-1] != 0]
        assert real[0] == seq[0]
        labels = {int(x) for w in windows for x in w[1:] if x != 0}
        assert set(seq[1:].tolist()) <= labels
        # every window is a contiguous slice of the sequence, left-padded
        for w in windows:
            items = w[w != 0]
            assert (w[:width - len(items)] == 0).all()
            start = int(np.flatnonzero(seq == items[0])[0])
            assert seq[start:start + len(items)].tolist() == items.tolist()
    assert row == len(out)
