"""Leave-one-out split: last item for test, second-last for validation, the rest for training."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from llamarec.data.dataset import Dataset

Split = Literal["val", "test"]


def train_sequence(seq: np.ndarray) -> np.ndarray:
    return seq[:-2]


def training_prefixes(sequences: list[np.ndarray]) -> np.ndarray:
    """``[n, 2]`` (user, position) pairs of every training item with at least one item before
    it: the next-item examples the training part holds (validation and test items excluded)."""
    return np.array([(u, p) for u, s in enumerate(sequences) for p in range(1, len(s) - 2)],
                    dtype=np.int64).reshape(-1, 2)


def among_last_prefixes(sequences: list[np.ndarray], users: np.ndarray, positions: np.ndarray,
                        n: int | None) -> np.ndarray:
    """Which ``(user, position)`` training prefixes are among their user's last ``n`` (all when
    ``n`` is None): their targets are the latest training items, just before the validation and
    test targets. A user's last training position is ``len(sequence) - 3``."""
    if n is None:
        return np.ones(len(users), dtype=bool)
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    return positions >= lengths[users] - 2 - n


def history_and_target(seq: np.ndarray, split: Split) -> tuple[np.ndarray, int]:
    """The history a model sees and the item it must find: validation predicts the
    second-last item from the training part, test the last from everything before it."""
    if split == "val":
        return seq[:-2], int(seq[-2])
    return seq[:-1], int(seq[-1])


def eval_examples(ds: Dataset, split: Split) -> tuple[list[np.ndarray], np.ndarray]:
    """Histories and targets of every user for ``split``."""
    pairs = [history_and_target(s, split) for s in ds.sequences]
    return [h for h, _ in pairs], np.array([t for _, t in pairs], dtype=np.int64)


def pad_left(histories: list[np.ndarray] | list[list[int]], max_len: int) -> torch.Tensor:
    """Right-align histories into a 0-padded ``[B, max_len]`` tensor, keeping the last items."""
    out = torch.zeros(len(histories), max_len, dtype=torch.long)
    for row, hist in enumerate(histories):
        tail = np.array(hist, dtype=np.int64)[-max_len:]
        if len(tail):
            out[row, -len(tail):] = torch.from_numpy(tail)
    return out
