"""Chunked retrieval: the chunk size follows the memory budget, and top-k candidates and
full-ranking ranks computed chunk by chunk equal those of the whole users x items matrix."""

import json
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from llamarec.data.split import pad_left
from llamarec.metrics import exclude_items, target_ranks
from llamarec.retrieval.evaluate import chunk_size, evaluate_ranks, top_k, top_k_and_ranks
from llamarec.retrieval.models import build_model
from llamarec.retrieval.models.base import RetrieverConfig, SequentialRecommender

N_ITEMS = 40
BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "retrieval_scale.py"


class LastItemScores(SequentialRecommender):
    """Scores that depend only on the last history item, read from a table of small integers:
    many exact ties, and the same bits whatever the chunk a user is scored in."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__(RetrieverConfig(n_items=table.shape[1] - 1, hidden=2, n_heads=1))
        self.register_buffer("table", table)

    def score_last(self, history: torch.Tensor) -> torch.Tensor:
        return self.table[history[:, -1]].clone()


def random_case(seed: int, n_users: int = 37) -> tuple[LastItemScores, list[np.ndarray], np.ndarray]:
    """Histories of 1..12 items with repeats; a third of the targets re-consumed (in the
    history); scores with ties, -inf, +inf and NaN entries."""
    rng = np.random.default_rng(seed)
    table = torch.from_numpy(rng.integers(0, 6, (N_ITEMS + 1, N_ITEMS + 1)).astype(np.float32))
    odd = torch.from_numpy(rng.random(table.shape) < 0.03)
    table[odd] = torch.tensor([float("-inf"), float("inf"), float("nan")])[torch.randint(0, 3, (int(odd.sum()),))]
    histories = [rng.integers(1, N_ITEMS + 1, rng.integers(1, 13)) for _ in range(n_users)]
    targets = np.array([rng.choice(h) if rng.random() < 0.33 else rng.integers(1, N_ITEMS + 1)
                        for h in histories], dtype=np.int64)
    for user, odd_score in enumerate((float("nan"), float("-inf"), float("inf"))):  # targets too
        table[histories[user][-1], targets[user]] = odd_score
    return LastItemScores(table), histories, targets


def whole_matrix(model: SequentialRecommender, histories: list[np.ndarray], targets: np.ndarray,
                 k: int, max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reference: every user's scores at once, through ``metrics.exclude_items`` and
    ``metrics.target_ranks``."""
    with torch.inference_mode():
        scores = model.score_last(pad_left(histories, max_len)).float()
    full = pad_left(histories, max(len(h) for h in histories))
    labels = torch.from_numpy(targets)
    best = exclude_items(scores, full).topk(k, dim=1)
    ranks = target_ranks(exclude_items(scores, full, keep=labels), labels)
    return best.indices.numpy(), best.values.numpy(), ranks.numpy()


def assert_same(got: tuple[np.ndarray, ...], want: tuple[np.ndarray, ...]) -> None:
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


def test_chunk_size_follows_the_memory_budget():
    assert chunk_size(1_000_001, 256 * 2**20) == 67  # 67 rows of 4 MB
    assert chunk_size(1_000_001, 256 * 2**20, limit=128) == 67
    assert chunk_size(10_001, 256 * 2**20, limit=128) == 128  # small catalogues: the batch size
    assert chunk_size(1_000_001, 1) == 1  # never below one user


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("batch_size, budget", [(1, 10**9), (4, 10**9), (1000, 10**9), (1000, 1)])
def test_chunked_equals_the_whole_matrix(seed, batch_size, budget):
    model, histories, targets = random_case(seed)
    want = whole_matrix(model, histories, targets, k=8, max_len=5)
    assert (want[2] == N_ITEMS).any()  # a NaN or -inf target ranks last
    assert any(t in h for h, t in zip(histories, targets))  # re-consumed targets
    got = top_k_and_ranks(model, histories, targets, 8, 5, batch_size=batch_size, memory_budget=budget)
    assert_same(got, want)
    assert_same(top_k(model, histories, 8, 5, batch_size=batch_size, memory_budget=budget), want[:2])
    np.testing.assert_array_equal(
        evaluate_ranks(model, histories, targets, 5, batch_size=batch_size, memory_budget=budget), want[2])


def test_a_padding_target_ranks_last_as_in_the_whole_matrix():
    """Item 0 is the padding column, excluded like the history: a target of 0 (bad input, or a
    stand-in model) ranks last, as ``metrics.target_ranks`` ranks it, not by its raw score."""
    model, histories, targets = random_case(3)
    targets[:5] = 0
    model.table[:, 0] = 10.0  # the padding column would outscore every item
    want = whole_matrix(model, histories, targets, k=8, max_len=5)
    assert (want[2][:5] == N_ITEMS).all()
    np.testing.assert_array_equal(evaluate_ranks(model, histories, targets, 5, batch_size=4), want[2])


def test_a_tiny_budget_scores_one_user_at_a_time_with_the_same_results():
    model, histories, targets = random_case(7)
    seen, chunks = [], []
    score_last = model.score_last

    def counted(history: torch.Tensor) -> torch.Tensor:
        assert all(chunk() is None for chunk in chunks)  # the previous chunk is freed first
        seen.append(len(history))
        scores = score_last(history)
        chunks.append(weakref.ref(scores))
        return scores

    model.score_last = counted
    got = top_k_and_ranks(model, histories, targets, 5, 4, batch_size=128, memory_budget=1)
    assert seen == [1] * len(histories)
    assert_same(got, whole_matrix(model, histories, targets, k=5, max_len=4))


def test_chunked_lrurec_matches_the_whole_matrix():
    """A real model's float sums depend on its batch size, so its scores agree to rounding only;
    the items and ranks are the same here."""
    torch.manual_seed(0)
    model = build_model("lru", RetrieverConfig(n_items=300, max_len=8, hidden=16)).eval()
    rng = np.random.default_rng(0)
    histories = [rng.integers(1, 301, rng.integers(1, 20)) for _ in range(50)]
    targets = rng.integers(1, 301, 50)
    want = whole_matrix(model, histories, targets, k=20, max_len=8)
    budget = 7 * 301 * 4  # 7 users per chunk
    items, scores, ranks = top_k_and_ranks(model, histories, targets, 20, 8, memory_budget=budget)
    np.testing.assert_array_equal(items, want[0])
    np.testing.assert_allclose(scores, want[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ranks, want[2])


def test_benchmark_smoke():
    out = subprocess.run([sys.executable, str(BENCHMARK), "--items", "1000", "--users", "50", "--json"],
                         capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(out.stdout)
    assert result["items"] == 1000 and result["users"] == 50 and result["users_per_s"] > 0
    assert result["naive_matrix_mb"] == pytest.approx(50 * 1001 * 4 / 2**20)
    assert result["peak_rss_mb"] >= result["baseline_rss_mb"] > 0
