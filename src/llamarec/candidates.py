"""A retriever run's candidates on disk: each user's top-k items and scores per split, and
optionally those of training prefixes (written by :mod:`llamarec.retrieval.candidates`, read by
the ranking stage, which never needs the retriever itself)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llamarec.checkpoint import load_tensors
from llamarec.configs import read_json_file
from llamarec.errors import LlamarecError
from llamarec.layout import CANDIDATES_FILE, CANDIDATES_SUMMARY
from llamarec.manifest import verify


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
    tensors = _load(run_dir)
    names = ("items", "scores", "targets", "ranks")
    _check(path, tensors, split, names)
    cands = Candidates(*(tensors[f"{split}.{n}"].numpy() for n in names))
    if cands.items.ndim != 2 or cands.scores.shape != cands.items.shape \
            or not cands.targets.shape == cands.ranks.shape == cands.items.shape[:1]:
        raise LlamarecError(f"{path}: {split} tensors of inconsistent shapes (a damaged file); "
                            f"rerun `llamarec retrieve candidates --run {run_dir}`")
    return cands


def load_train_candidates(run_dir: Path) -> dict[str, np.ndarray]:
    """Training-prefix candidates (``users, positions, items, scores, targets``), if generated."""
    path = run_dir / CANDIDATES_FILE
    tensors = _load(run_dir)
    if "train.items" not in tensors:
        summary = read_json_file(run_dir / CANDIDATES_SUMMARY)
        raise LlamarecError(f"{run_dir}: candidates (k={summary.get('k')}) hold no training prefixes; "
                            "rerun `llamarec retrieve candidates` with --train-prefixes N")
    _check(path, tensors, "train", ("users", "positions", "items", "scores", "targets"))
    return {k.split(".", 1)[1]: v.numpy() for k, v in tensors.items() if k.startswith("train.")}


def _load(run_dir: Path) -> dict:
    path = run_dir / CANDIDATES_FILE
    if not path.is_file():
        raise LlamarecError(f"{run_dir}: no candidates; run `llamarec retrieve candidates --run {run_dir}`")
    verify(run_dir, CANDIDATES_FILE)
    return load_tensors(path)[0]


def _check(path: Path, tensors: dict, split: str, names: tuple[str, ...]) -> None:
    """Every tensor of ``split`` is there, item ids are ids of the run's items and scores are finite."""
    missing = [f"{split}.{n}" for n in names if f"{split}.{n}" not in tensors]
    if missing:
        raise LlamarecError(f"{path}: no {', '.join(missing)} (a damaged or foreign file); "
                            f"rerun `llamarec retrieve candidates --run {path.parent}`")
    from llamarec.retrieval.load import read_retrieval_config

    n_items = read_retrieval_config(path.parent)[1].n_items
    items, scores = tensors[f"{split}.items"], tensors[f"{split}.scores"]
    if items.numel() and (items.is_floating_point() or int(items.min()) < 1 or int(items.max()) > n_items):
        raise LlamarecError(f"{path}: {split} candidates are not ids of the run's {n_items} items (a damaged file)")
    if not bool(scores.isfinite().all()):
        raise LlamarecError(f"{path}: {split} scores are NaN or infinite (a damaged file)")
