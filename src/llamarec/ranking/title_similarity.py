"""A ranker without prompts: candidates scored by the LLM's picture of their titles.

The LLM embeds every catalogue title once (:func:`llamarec.ranking.title_vectors.embed_titles`:
its mean last-layer hidden state, centred over the catalogue, unit length). A candidate's score
is the dot product of its vector with the mean vector of the user's last ``max_history`` items,
fused with the retriever like the verbalizer's letter logits. The vectors are the whole ranker:
serving it loads no LLM and costs one small matrix product per batch. It needs no training, and
where titles say what a user picks next (games, in the README) it beats the retriever, where the
fine-tuned verbalizer does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from llamarec.checkpoint import load_tensors
from llamarec.errors import LlamarecError
from llamarec.layout import TITLE_VECTORS_FILE
from llamarec.ranking.scoring import ScoringConfig, fuse


class TitleSimilarityRanker:
    """Scores candidates by their title vector's dot product with the user's recent titles'.

    ``vectors[i]`` is item ``i``'s title vector (row 0, padding, is zero). It offers what the
    faces use of a :class:`~llamarec.ranking.ranker.Ranker`: ``rerank``, ``titles``,
    ``batch_size``, ``dtype_name`` and a ``prefix_cache`` that is always None (no prompts)."""

    dtype_name = "float32"
    prefix_cache = None

    def __init__(self, vectors: torch.Tensor, titles: Sequence[str], max_history: int,
                 batch_size: int = 256) -> None:
        self.vectors, self.titles = vectors.float(), titles
        self.max_history, self.batch_size = max_history, batch_size

    def score(self, histories: Sequence[Sequence[int]], candidates: np.ndarray) -> torch.Tensor:
        """``[len(histories), k]`` similarities, aligned with ``candidates``."""
        profiles = torch.stack([self.vectors[torch.as_tensor(list(h)[-self.max_history:], dtype=torch.long)].mean(0)
                                for h in histories])
        cands = self.vectors[torch.as_tensor(np.asarray(candidates), dtype=torch.long)]
        return torch.einsum("bd,bkd->bk", profiles, cands)

    def rerank(self, histories: Sequence[Sequence[int]], candidates: np.ndarray, retriever_scores: np.ndarray,
               scoring: ScoringConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """Similarities and final (fused) scores, as :meth:`Ranker.rerank
        <llamarec.ranking.ranker.Ranker.rerank>` returns them."""
        if any(len(h) == 0 for h in histories):
            raise LlamarecError("a history needs at least one item")
        sim = self.score(histories, candidates)
        ret = torch.as_tensor(np.asarray(retriever_scores), dtype=torch.float32)
        return sim, fuse(scoring.ranker_scale * sim, ret, scoring.fusion_weight, scoring.retriever_temperature)


def load_title_ranker(rank_dir: Path, titles: Sequence[str], max_history: int,
                      batch_size: int = 256) -> TitleSimilarityRanker:
    """The title vectors of a ``title_similarity`` ranker run, checked against the catalogue."""
    path = rank_dir / TITLE_VECTORS_FILE
    tensors, _ = load_tensors(path)
    vectors = tensors.get("vectors")
    if vectors is None or vectors.ndim != 2 or not vectors.is_floating_point():
        raise LlamarecError(f"{path}: expected a 2-D float tensor 'vectors' (a damaged or foreign file)")
    if vectors.shape[0] != len(titles):
        raise LlamarecError(f"{path}: vectors for {vectors.shape[0] - 1} items, but the catalogue has "
                            f"{len(titles) - 1} (the ranker of another run?)")
    if not torch.isfinite(vectors).all():
        raise LlamarecError(f"{path}: holds NaN or infinite values (damaged weights)")
    return TitleSimilarityRanker(vectors, titles, max_history, batch_size)
