"""Cutting training sequences into fixed-length, left-padded windows."""

from __future__ import annotations

import numpy as np


def training_windows(sequences: list[np.ndarray], max_len: int, step: int) -> np.ndarray:
    """Windows of ``max_len + 1`` items (inputs plus the next-item labels), left-padded with 0.

    A sequence that fits gives one window. A longer one is cut into windows ending at its last
    item and every ``step`` items before it; the earliest window starts at the first item, so
    every item is predicted at least once.
    """
    width = max_len + 1
    rows: list[np.ndarray] = []
    for seq in sequences:
        if len(seq) < 2:
            continue
        ends = list(range(len(seq), width, -step))
        if not ends or ends[-1] != width:
            ends.append(min(width, len(seq)))
        for end in ends:
            chunk = seq[max(0, end - width):end]
            row = np.zeros(width, dtype=np.int64)
            row[width - len(chunk):] = chunk
            rows.append(row)
    return np.stack(rows) if rows else np.zeros((0, width), dtype=np.int64)
