"""A retriever run's candidates on disk: each user's top-k items and scores per split, and
optionally those of training prefixes (written by :mod:`llamarec.retrieval.candidates`, read by
the ranking stage, which never needs the retriever itself)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llamarec.checkpoint import load_tensors
from llamarec.errors import LlamarecError
from llamarec.layout import CANDIDATES_FILE, CANDIDATES_SUMMARY


@dataclass
class Candidates:
    """Top-k items per user for one split, the true items and their full-ranking ranks."""

    items: np.ndarray  # [U, k] item ids, best first
    scores: np.ndarray  # [U, k]
    targets: np.ndarray  # [U]
    ranks: np.ndarray  # [U] 0-based rank of the target among all items (>= k if not a candidate)

    @property
    def k(self) -> int:
        return self.items.shape[1]

    def valid(self) -> np.ndarray:
        """Mask of users whose target is among the candidates (the paper's valid subset)."""
        return self.ranks < self.k


def load_candidates(run_dir: Path, split: str) -> Candidates:
    """Read one split (``val`` or ``test``) of a run's candidates."""
    path = run_dir / CANDIDATES_FILE
    if not path.is_file():
        raise LlamarecError(f"{run_dir}: no candidates; run `llamarec retrieve candidates --run {run_dir}`")
    tensors, _ = load_tensors(path)
    return Candidates(*(tensors[f"{split}.{n}"].numpy() for n in ("items", "scores", "targets", "ranks")))


def load_train_candidates(run_dir: Path) -> dict[str, np.ndarray]:
    """Training-prefix candidates (``users, positions, items, scores, targets``), if generated."""
    tensors, _ = load_tensors(run_dir / CANDIDATES_FILE)
    if "train.items" not in tensors:
        summary = json.loads((run_dir / CANDIDATES_SUMMARY).read_text())
        raise LlamarecError(f"{run_dir}: candidates (k={summary['k']}) hold no training prefixes; "
                            "rerun `llamarec retrieve candidates` with --train-prefixes N")
    return {k.split(".", 1)[1]: v.numpy() for k, v in tensors.items() if k.startswith("train.")}
