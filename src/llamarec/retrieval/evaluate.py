"""Full-ranking evaluation and top-k retrieval over all items, history excluded."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from llamarec.data.split import pad_left
from llamarec.metrics import exclude_items, metrics_from_ranks, target_ranks
from llamarec.retrieval.models.base import SequentialRecommender


@torch.inference_mode()
def iter_scores(model: SequentialRecommender, histories: list[np.ndarray], max_len: int,
                batch_size: int) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """Yield ``(rows, scores [b, n_items+1], full_history [b, H])`` batch by batch, on the CPU
    whatever the model's device. The model sees the last ``max_len`` items; the whole history
    is returned for exclusion."""
    was_training = model.training
    weight = next(model.parameters(), None)
    device = weight.device if weight is not None else torch.device("cpu")
    model.eval()
    try:
        for start in range(0, len(histories), batch_size):
            chunk = histories[start:start + batch_size]
            longest = max(len(h) for h in chunk)
            scores = model.score_last(pad_left(chunk, max_len).to(device)).float().cpu()
            yield slice(start, start + len(chunk)), scores, pad_left(chunk, max(longest, 1))
    finally:
        model.train(was_training)


def evaluate_ranks(model: SequentialRecommender, histories: list[np.ndarray], targets: np.ndarray,
                   max_len: int, batch_size: int = 128) -> np.ndarray:
    """0-based rank of each target among all items with the user's history excluded."""
    ranks = np.empty(len(histories), dtype=np.int64)
    labels = torch.from_numpy(targets)
    for rows, scores, hist in iter_scores(model, histories, max_len, batch_size):
        masked = exclude_items(scores, hist, keep=labels[rows])
        ranks[rows] = target_ranks(masked, labels[rows]).numpy()
    return ranks


def evaluate(model: SequentialRecommender, histories: list[np.ndarray], targets: np.ndarray,
             max_len: int, batch_size: int = 128, ks=(1, 5, 10, 20)) -> dict[str, float]:
    return metrics_from_ranks(torch.from_numpy(evaluate_ranks(model, histories, targets, max_len,
                                                              batch_size)), ks)


def top_k(model: SequentialRecommender, histories: list[np.ndarray], k: int, max_len: int,
          batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best items per history (history items and padding excluded) and their scores."""
    items = np.empty((len(histories), k), dtype=np.int64)
    values = np.empty((len(histories), k), dtype=np.float32)
    for rows, scores, hist in iter_scores(model, histories, max_len, batch_size):
        best = exclude_items(scores, hist).topk(k, dim=1)
        items[rows], values[rows] = best.indices.numpy(), best.values.numpy()
    return items, values
