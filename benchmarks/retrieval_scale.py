"""Retriever at scale: top-k candidates and full-ranking ranks for many users over a large
catalogue, in chunks of users, with the peak memory and users per second.

    python benchmarks/retrieval_scale.py [--items 1000000] [--users 100000] [--threads 1]
                                         [--memory-budget-mb 256] [--k 20] [--json]

A randomly initialised LRURec (hidden 64, two blocks, sequences of up to 50 items, as for the
Amazon datasets) is built from its config for ``--items`` items; no dataset is read. Each
synthetic user has a history of 1 to 50 random items and a random target. One pass of
``retrieval.evaluate.top_k_and_ranks`` gives every user's top-k candidates and the rank of the
target among all items with the history excluded (the full-ranking metrics come from those
ranks), ``--memory-budget-mb`` setting the users per chunk.

Memory is the process's resident set: the baseline once the model and the histories exist,
the peak over the run (Linux: the kernel's peak mark is reset just before it; elsewhere the
peak covers the whole process). Beside it, the plain approach's users x items float32 score
matrix (computed, never allocated) and, as the speed limit, scoring alone: the item-table
matmul for one chunk, the work no full ranking avoids, timed on its own.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from llamarec.metrics import metrics_from_ranks
from llamarec.retrieval.evaluate import chunk_size, top_k_and_ranks
from llamarec.retrieval.models import build_model
from llamarec.retrieval.models.base import RetrieverConfig, SequentialRecommender

MAX_LEN = 50
BATCH_SIZE = 128  # the retrievers' eval_batch_size: the most users per chunk, whatever the budget
MB = 2**20


def synthetic_users(n_users: int, n_items: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Histories of 1..MAX_LEN uniformly random items and one random target per user."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, MAX_LEN + 1, n_users)
    flat = rng.integers(1, n_items + 1, int(lengths.sum()))
    histories = np.split(flat, np.cumsum(lengths)[:-1])
    return histories, rng.integers(1, n_items + 1, n_users)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark so that ``ru_maxrss`` covers only what follows
    (Linux); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mb() -> float:
    unit = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / MB


@torch.inference_mode()
def scoring_rate(model: SequentialRecommender, chunk: int, repeats: int = 3) -> float:
    """Users per second of the item-table matmul alone, one chunk of random hidden states at a time."""
    hidden = torch.randn(chunk, model.config.hidden)
    model.scores(hidden)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        model.scores(hidden)
    return chunk * repeats / (time.perf_counter() - start)


def run(n_items: int, n_users: int, threads: int, budget_mb: float, k: int, seed: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = build_model("lru", RetrieverConfig(n_items=n_items, max_len=MAX_LEN)).eval()
    histories, targets = synthetic_users(n_users, n_items, seed)
    budget = int(budget_mb * MB)
    chunk = min(chunk_size(n_items + 1, budget, BATCH_SIZE), n_users)
    limit = scoring_rate(model, chunk)
    gc.collect()
    run_only = reset_peak_rss()
    baseline = peak_rss_mb()
    start = time.perf_counter()
    _, _, ranks = top_k_and_ranks(model, histories, targets, k, MAX_LEN, BATCH_SIZE, budget)
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    return {
        "items": n_items, "users": n_users, "k": k, "threads": threads,
        "memory_budget_mb": budget_mb, "chunk_users": chunk,
        "chunk_scores_mb": chunk * (n_items + 1) * 4 / MB,
        "seconds": seconds, "users_per_s": n_users / seconds,
        "limit_users_per_s": limit,
        "baseline_rss_mb": baseline, "peak_rss_mb": peak, "peak_extra_mb": peak - baseline,
        "peak_covers": "run" if run_only else "process",
        "naive_matrix_mb": n_users * (n_items + 1) * 4 / MB,
        "metrics": metrics_from_ranks(torch.from_numpy(ranks), (10, 20)),
        "torch": torch.__version__,
    }


def print_table(r: dict) -> None:
    table = Table("", "users/s", "memory MB", "that memory is",
                  title=f"{r['users']:,} users x {r['items']:,} items, top-{r['k']} + full-ranking ranks")
    table.add_row("limit: item-table matmul", f"{r['limit_users_per_s']:,.1f}", f"{r['chunk_scores_mb']:,.0f}",
                  "one chunk's scores")
    table.add_row("plain: users x items", "—", f"{r['naive_matrix_mb']:,.0f}", "all scores (not allocated)")
    table.add_row("llamarec: chunked", f"{r['users_per_s']:,.1f}", f"{r['peak_extra_mb']:,.0f}",
                  "peak over the baseline")
    Console().print(table)
    print(f"{r['seconds']:.1f} s, {r['threads']} thread(s), torch {r['torch']}; chunks of {r['chunk_users']} users "
          f"from a {r['memory_budget_mb']:g} MB budget; peak RSS {r['peak_rss_mb']:,.0f} MB over the "
          f"{r['peak_covers']}, baseline {r['baseline_rss_mb']:,.0f} MB (model and histories); "
          f"NDCG@10 of the random model {r['metrics']['NDCG@10']:.5f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--memory-budget-mb", type=float, default=256,
                        help="memory for one chunk's score matrix; sets the users per chunk")
    parser.add_argument("--k", type=int, default=20, help="candidates per user")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    result = run(args.items, args.users, args.threads, args.memory_budget_mb, args.k, args.seed)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)


if __name__ == "__main__":
    main()
