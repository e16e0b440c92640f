"""Candidate generation: each user's top-k items from the retriever, stored compactly.

For validation (history = training part) and test (history = training + validation) every
user gets ``k`` items and scores, plus the full-ranking rank of the true item so that the
paper's overall metrics can be computed later. On request, training prefixes get their top-k
too (hard negatives for the ranker). Arrays are users x k, never users x all items: users are
scored in chunks (``retrieval.evaluate``), each reduced to its top-k and the target's rank.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from llamarec.candidates import Candidates
from llamarec.catalogue import Catalogue
from llamarec.checkpoint import save_tensors
from llamarec.data.split import eval_examples, training_prefixes
from llamarec.errors import LlamarecError
from llamarec.io import write_json
from llamarec.layout import CANDIDATES_FILE, CANDIDATES_SUMMARY, CATALOGUE_FILE, RETRIEVER_MODEL
from llamarec.manifest import record
from llamarec.metrics import metrics_from_ranks
from llamarec.retrieval.evaluate import top_k, top_k_and_ranks
from llamarec.retrieval.train import load_retriever


def generate_candidates(run_dir: Path, k: int = 20, train_prefixes: int = 0, seed: int = 0,
                        device: str = "cpu") -> dict:
    """Write ``candidates.safetensors`` and ``candidates.json`` into ``run_dir``.

    ``train_prefixes`` > 0 also scores up to that many randomly chosen training prefixes
    (history = the items before a training position, target = the item at it). The model
    scores on ``device``; what is written does not depend on it beyond float rounding.
    """
    model, cfg, ds = load_retriever(run_dir, device)
    # Every history item is excluded, so k must leave room for k real items after the longest
    # history (test histories are the longest); otherwise history items or padding fill the rest.
    longest = max((len(np.unique(h)) for h in eval_examples(ds, "test")[0]), default=0)
    if not 1 <= k <= ds.n_items - longest:
        raise LlamarecError(f"--k {k}: must be between 1 and {ds.n_items - longest} (the {ds.n_items} "
                            f"items less the longest history, {longest} items)")
    tensors: dict[str, torch.Tensor] = {}
    summary: dict = {"k": k, "dataset": cfg.dataset, "model": cfg.model}
    for split in ("val", "test"):
        histories, targets = eval_examples(ds, split)
        items, scores, ranks = top_k_and_ranks(model, histories, targets, k, cfg.max_len, cfg.eval_batch_size)
        _check_finite(scores, run_dir)
        # A re-consumed target (already in the history) stays scorable in the full ranking but,
        # like every history item, is never a candidate: count it as a miss (rank >= k), so that
        # valid() means "the target is among the candidates".
        ranks = np.where((items == targets[:, None]).any(1), ranks, np.maximum(ranks, k))
        cand = Candidates(items, scores, targets, ranks)
        for name in ("items", "scores", "targets", "ranks"):
            tensors[f"{split}.{name}"] = torch.from_numpy(np.ascontiguousarray(getattr(cand, name)))
        summary[split] = {
            "users": len(targets), "valid_subset": int(cand.valid().sum()),
            "metrics": metrics_from_ranks(torch.from_numpy(ranks), (1, 5, 10, 20)),
        }
    if train_prefixes > 0:
        users, positions = _sample_prefixes(ds.sequences, train_prefixes, seed)
        histories = [ds.sequences[u][:p] for u, p in zip(users, positions)]
        items, scores = top_k(model, histories, k, cfg.max_len, cfg.eval_batch_size)
        _check_finite(scores, run_dir)
        targets = np.array([ds.sequences[u][p] for u, p in zip(users, positions)], dtype=np.int64)
        for name, value in (("users", users), ("positions", positions), ("items", items),
                            ("scores", scores), ("targets", targets)):
            tensors[f"train.{name}"] = torch.from_numpy(np.ascontiguousarray(value))
        summary["train"] = {"prefixes": len(users),
                            "target_in_candidates": float((items == targets[:, None]).any(1).mean())}
    save_tensors(run_dir / CANDIDATES_FILE, tensors)
    record(run_dir, run_dir / CANDIDATES_FILE)
    if not (run_dir / CATALOGUE_FILE).is_file():  # runs trained before runs carried a catalogue
        Catalogue(ds.item_raw_ids, ds.titles).save(run_dir / CATALOGUE_FILE)
        record(run_dir, run_dir / CATALOGUE_FILE)
    write_json(run_dir / CANDIDATES_SUMMARY, summary)
    record(run_dir, run_dir / CANDIDATES_SUMMARY)
    return summary


def _check_finite(scores: np.ndarray, run_dir: Path) -> None:
    """Candidates are never written with NaN or infinite scores (damaged weights)."""
    if not np.isfinite(scores).all():
        raise LlamarecError(f"{run_dir / RETRIEVER_MODEL}: the retriever gives NaN or infinite scores, so no "
                            "candidates were written (its weights are damaged; retrain it)")


def _sample_prefixes(sequences: list[np.ndarray], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` (user, position) pairs drawn uniformly from all training positions >= 1."""
    pairs = training_prefixes(sequences)
    rng = np.random.default_rng(seed)
    if len(pairs) > n:
        pairs = pairs[np.sort(rng.choice(len(pairs), n, replace=False))]
    return pairs[:, 0], pairs[:, 1]
