"""Full-ranking evaluation and top-k retrieval over all items, history excluded.

Users are scored in chunks, and each chunk is reduced to its top-k items and the target's rank
before the next one is scored, so memory holds one chunk's ``[users, n_items + 1]`` score
matrix, never users x items. The chunk size comes from a memory budget for that matrix (capped
by ``batch_size``, which bounds the model's own forward pass): at 1,000,000 items the default
256 MiB allows 67 users per chunk, while catalogues of up to 500,000 items keep chunks of 128.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from llamarec.data.split import pad_left
from llamarec.metrics import metrics_from_ranks
from llamarec.retrieval.models.base import SequentialRecommender

DEFAULT_MEMORY_BUDGET = 256 * 2**20  # bytes for one chunk's float32 score matrix
SCORE_BYTES = 4  # float32


def chunk_size(n_scores: int, memory_budget: int, limit: int | None = None) -> int:
    """Users per chunk whose ``[users, n_scores]`` float32 score matrix fits ``memory_budget``
    bytes (at least 1), and at most ``limit``."""
    size = max(1, memory_budget // (n_scores * SCORE_BYTES))
    return size if limit is None else max(1, min(size, limit))


def _n_scores(model: SequentialRecommender) -> int | None:
    """Width of the model's score rows (padding column + items); None for a stand-in model
    without a retriever config, which is then scored in chunks of ``batch_size``."""
    config = getattr(model, "config", None)
    return config.n_items + 1 if config is not None else None


def iter_scores(model: SequentialRecommender, histories: list[np.ndarray], max_len: int,
                batch_size: int = 128, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                ) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """Yield ``(rows, scores [b, n_items+1], full_history [b, H])`` chunk by chunk, on the CPU
    whatever the model's device. The model sees the last ``max_len`` items; the whole history
    is returned for exclusion. ``b`` is at most ``batch_size`` and small enough for the scores
    to fit ``memory_budget`` bytes; the scores are the model's fresh output, free to modify.
    Callers drop their ``scores`` before asking for the next chunk (``del scores`` at the end
    of the loop body), or two chunks are in memory while the next one is scored."""
    n_scores = _n_scores(model)
    size = batch_size if n_scores is None else chunk_size(n_scores, memory_budget, batch_size)
    was_training = model.training
    weight = next(model.parameters(), None)
    device = weight.device if weight is not None else torch.device("cpu")
    model.eval()
    try:
        for start in range(0, len(histories), size):
            chunk = histories[start:start + size]
            longest = max(len(h) for h in chunk)
            # no_grad, not inference_mode: callers modify the scores in place, in any mode; and a
            # decorated generator would hold the chunk it yielded while scoring the next one
            with torch.no_grad():
                scores = model.score_last(pad_left(chunk, max_len).to(device)).float().cpu()
            yield slice(start, start + len(chunk)), scores, pad_left(chunk, max(longest, 1))
            del scores
    finally:
        model.train(was_training)


def _exclude_history(scores: torch.Tensor, history: torch.Tensor) -> None:
    """In place: history items (``[b, H]``, 0-padded) and the padding column 0 at -inf."""
    scores.scatter_(1, history, float("-inf"))
    scores[:, 0] = float("-inf")


def _exclude_and_rank(scores: torch.Tensor, history: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """Exclude the history from ``scores`` in place and return each target's 0-based rank among
    the items left, as ``metrics.target_ranks`` counts it after ``metrics.exclude_items`` with
    the target kept: every other item scoring at least the target is above it, NaN counts as
    -inf, and a re-consumed target (in the history) keeps its score.

    Counting one row at a time keeps the comparison's temporary at one row, and numpy counts
    true values several times faster than a torch sum over booleans. An item scoring at least
    a target above -inf is neither NaN nor excluded, so only the target's own column needs
    care: it counts itself unless exclusion took it out. A target at -inf ranks last."""
    picked = scores.gather(1, targets.view(-1, 1)).squeeze(1)
    # NaN counts as -inf, and so does the padding column: a target of 0 ranks last
    target_scores = torch.where(picked.isnan() | (targets == 0), float("-inf"), picked).numpy()
    _exclude_history(scores, history)
    own = scores.gather(1, targets.view(-1, 1)).squeeze(1).numpy()
    last = scores.shape[1] - 1
    ranks = np.empty(len(scores), dtype=np.int64)
    for i, (row, score) in enumerate(zip(scores.numpy(), target_scores)):
        ranks[i] = last if score == -np.inf else np.count_nonzero(row >= score) - int(own[i] >= score)
    return ranks


def _labels(targets: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(targets, dtype=np.int64))


def top_k_and_ranks(model: SequentialRecommender, histories: list[np.ndarray], targets: np.ndarray,
                    k: int, max_len: int, batch_size: int = 128,
                    memory_budget: int = DEFAULT_MEMORY_BUDGET) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`top_k` and :func:`evaluate_ranks` in one pass over the chunks: ``(items [U, k],
    scores [U, k], ranks [U])``, the same as the two give separately, for half the scoring."""
    items = np.empty((len(histories), k), dtype=np.int64)
    values = np.empty((len(histories), k), dtype=np.float32)
    ranks = np.empty(len(histories), dtype=np.int64)
    labels = _labels(targets)
    for rows, scores, hist in iter_scores(model, histories, max_len, batch_size, memory_budget):
        ranks[rows] = _exclude_and_rank(scores, hist, labels[rows])
        best = scores.topk(k, dim=1)
        items[rows], values[rows] = best.indices.numpy(), best.values.numpy()
        del scores
    return items, values, ranks


def evaluate_ranks(model: SequentialRecommender, histories: list[np.ndarray], targets: np.ndarray,
                   max_len: int, batch_size: int = 128,
                   memory_budget: int = DEFAULT_MEMORY_BUDGET) -> np.ndarray:
    """0-based rank of each target among all items with the user's history excluded (the
    target itself stays scorable), ties counted against it."""
    ranks = np.empty(len(histories), dtype=np.int64)
    labels = _labels(targets)
    for rows, scores, hist in iter_scores(model, histories, max_len, batch_size, memory_budget):
        ranks[rows] = _exclude_and_rank(scores, hist, labels[rows])
        del scores
    return ranks


def evaluate(model: SequentialRecommender, histories: list[np.ndarray], targets: np.ndarray,
             max_len: int, batch_size: int = 128, ks=(1, 5, 10, 20),
             memory_budget: int = DEFAULT_MEMORY_BUDGET) -> dict[str, float]:
    ranks = evaluate_ranks(model, histories, targets, max_len, batch_size, memory_budget)
    return metrics_from_ranks(torch.from_numpy(ranks), ks)


def top_k(model: SequentialRecommender, histories: list[np.ndarray], k: int, max_len: int,
          batch_size: int = 128, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best items per history (history items and padding excluded) and their scores."""
    items = np.empty((len(histories), k), dtype=np.int64)
    values = np.empty((len(histories), k), dtype=np.float32)
    for rows, scores, hist in iter_scores(model, histories, max_len, batch_size, memory_budget):
        _exclude_history(scores, hist)
        best = scores.topk(k, dim=1)
        items[rows], values[rows] = best.indices.numpy(), best.values.numpy()
        del scores
    return items, values
