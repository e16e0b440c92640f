"""The two-stage recommender: retriever top-k, then the LLM ranker, then fusion.

:class:`Recommender` is the one object the CLI, the Python API, the server and batch scoring
use. It loads everything from a run directory (retriever weights, item catalogue, ranker
adapter, scoring config) and nothing from the dataset, so a run can be copied and served
anywhere the base LLM can be found. ``retrieve`` and ``rerank`` are the two stages;
evaluation reranks through the same :meth:`Ranker.rerank <llamarec.ranking.ranker.Ranker.rerank>`.
"""

from __future__ import annotations

import difflib
import logging
import numbers
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from llamarec.catalogue import Catalogue
from llamarec.devices import auto_dtype, resolve_device
from llamarec.errors import LlamarecError
from llamarec.layout import (
    CANDIDATES_SUMMARY,
    CATALOGUE_FILE,
    PIPELINE_METRICS,
    RANK_TRAIN_METRICS,
    RANKER_DIR,
    RETRIEVER_DIR,
)
from llamarec.ranking.config import ranker_saved
from llamarec.ranking.prefix_cache import PrefixCache
from llamarec.ranking.scoring import ScoringConfig
from llamarec.retrieval.evaluate import top_k
from llamarec.retrieval.load import load_retriever_model
from llamarec.retrieval.models.base import SequentialRecommender

logger = logging.getLogger(__name__)


@dataclass
class Recommendation:
    item_id: str  # the dataset's raw item id
    title: str
    score: float  # final (fused) score; higher is better
    retriever_score: float
    ranker_score: float | None


@dataclass
class RecommendResult:
    items: list[Recommendation]
    retrieval_ms: float
    ranking_ms: float
    error: str | None = None  # why this history got no recommendations (batch calls only)
    history: list[str] = field(default_factory=list)  # the resolved history, as raw item ids


class Recommender:
    """Retriever + optional LLM ranker + item catalogue, loaded from a run directory."""

    def __init__(self, retriever: SequentialRecommender, max_len: int, catalogue: Catalogue,
                 ranker=None, scoring: ScoringConfig | None = None, n_candidates: int = 20) -> None:
        self.retriever, self.max_len, self.catalogue = retriever.eval(), max_len, catalogue
        self.ranker, self.n_candidates = ranker, n_candidates
        self.scoring = scoring or ScoringConfig()
        self._by_raw_id = {raw: i for i, raw in enumerate(catalogue.raw_ids) if i > 0}
        self._by_title: dict[str, list[int]] = {}
        for i, title in enumerate(catalogue.titles[1:], 1):
            self._by_title.setdefault(title.casefold(), []).append(i)

    @classmethod
    def load(cls, run_dir: str | Path, *, with_ranker: bool = True, device: str = "cpu",
             dtype: str | None = None, prefix_cache_mb: float = 0) -> Recommender:
        """Load ``run_dir`` written by ``llamarec run`` (or a bare retriever run directory) on
        ``device``; ``dtype`` (``float32``, ``bfloat16``..., or ``auto``: the hardware's fast
        format, see :func:`llamarec.devices.auto_dtype`) overrides the models' own.

        ``prefix_cache_mb`` > 0 keeps the key/value caches of the ranker's prompt prefixes
        (instruction and history) of recent requests, least recently used out first, within
        that many MiB (on the ranker's device), so a repeated history runs only its candidates
        (``llamarec serve`` turns it on); 0, the default, keeps none.
        """
        from llamarec.ranking.llm import resolve_dtype

        if prefix_cache_mb < 0:
            raise LlamarecError(f"prefix_cache_mb must be at least 0, got {prefix_cache_mb}")
        if dtype == "auto":
            dtype = str(auto_dtype(resolve_device(device))).removeprefix("torch.")
        run_dir = Path(run_dir)
        retriever_dir = run_dir / RETRIEVER_DIR if (run_dir / RETRIEVER_DIR).is_dir() else run_dir
        torch_dtype = None if dtype is None else resolve_dtype(dtype, torch.device("cpu"))
        model, cfg = load_retriever_model(retriever_dir, device, torch_dtype)
        catalogue = _catalogue(retriever_dir, model.config.n_items)
        ranker, scoring, n_candidates = None, ScoringConfig(), 20
        if with_ranker and ranker_saved(run_dir / RANKER_DIR):
            from llamarec.ranking.config import verify_ranker_run
            from llamarec.ranking.ranker import load_ranker

            verify_ranker_run(run_dir / RANKER_DIR)
            cache = PrefixCache(int(prefix_cache_mb * 2**20)) if prefix_cache_mb > 0 else None
            ranker = load_ranker(run_dir / RANKER_DIR, catalogue.titles, device=device, dtype=dtype,
                                 prefix_cache=cache)
            scoring = _scoring(run_dir)
            # The ranker was fine-tuned, and the fusion weight tuned, on the run's top-k candidates.
            n_candidates = _n_candidates(retriever_dir, catalogue.n_items)
        return cls(model, cfg.max_len, catalogue, ranker, scoring, n_candidates)

    @property
    def prefix_cache(self) -> PrefixCache | None:
        """The ranker's cache of prompt prefixes (see :meth:`load`), None when off."""
        return None if self.ranker is None else self.ranker.prefix_cache

    # -- history resolution ---------------------------------------------------------------------
    def resolve_item(self, entry: int | str) -> int:
        """Dense id of a history entry: a raw item id, an exact title, or an unambiguous
        case-insensitive title."""
        if isinstance(entry, bool) or not isinstance(entry, (str, numbers.Integral)):
            raise LlamarecError(f"history item {entry!r}: expected an item id or a title, "
                                f"not {type(entry).__name__}")
        key = str(entry).strip()
        if key in self._by_raw_id:
            return self._by_raw_id[key]
        titles = self.catalogue.titles
        exact = [i for i in self._by_title.get(key.casefold(), []) if titles[i] == key]
        matches = exact or self._by_title.get(key.casefold(), [])
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            ids = ", ".join(self.catalogue.raw_ids[i] for i in matches)
            raise LlamarecError(f"history item {key!r} matches several items (ids {ids}); give an id")
        close = difflib.get_close_matches(key, titles[1:], n=5, cutoff=0.6)
        hint = f"; close matches: {'; '.join(close)}" if close else ""
        raise LlamarecError(f"history item {key!r} is neither an item id nor a title{hint}")

    def resolve_history(self, history: Sequence[int | str] | np.ndarray) -> np.ndarray:
        """Dense ids of a history, oldest first. A string or a set is refused (a string is not
        a list of items, a set has no order); a numpy array of ids is fine."""
        if isinstance(history, (str, bytes)):
            raise LlamarecError("a history is a list of item ids or titles, not one string")
        if isinstance(history, np.ndarray):
            history = history.tolist()
        if not isinstance(history, Sequence):
            raise LlamarecError(f"a history is a list (oldest first), not {type(history).__name__}")
        if not history:
            raise LlamarecError("a history needs at least one item")
        return np.array([self.resolve_item(e) for e in history], dtype=np.int64)

    def _check_k(self, k: object) -> int:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise LlamarecError(f"k={k!r}: must be a whole number")
        if not 1 <= k <= self.n_candidates:
            raise LlamarecError(f"k={k}: must be between 1 and the number of candidates ({self.n_candidates})")
        return int(k)

    # -- the two stages ---------------------------------------------------------------------------
    def retrieve(self, histories: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The retriever's top ``n_candidates`` items and scores per history (dense ids), best first."""
        items, scores = top_k(self.retriever, list(histories), self.n_candidates, self.max_len)
        if not np.isfinite(scores).all():
            raise LlamarecError("the retriever returned NaN or infinite scores: its weights are damaged")
        return items, scores

    def rerank(self, histories: Sequence[np.ndarray], candidates: np.ndarray,
               retriever_scores: np.ndarray) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Ranker scores (None without a ranker) and final scores, aligned with ``candidates``."""
        if self.ranker is None:
            return None, torch.as_tensor(retriever_scores, dtype=torch.float32)
        return self.ranker.rerank(histories, candidates, retriever_scores, self.scoring)

    # -- recommendation -------------------------------------------------------------------------
    def recommend(self, history: Sequence[int | str], k: int = 10) -> RecommendResult:
        result = self.recommend_batch([history], k)[0]
        if result.error is not None:
            raise LlamarecError(result.error)
        return result

    def recommend_batch(self, histories: Sequence[Sequence[int | str]], k: int = 10) -> list[RecommendResult]:
        """Recommend ``k`` items for each history; the ranker scores all histories in one
        batched pass. A history that cannot be resolved gets a result with ``error`` set and
        no items; the others are unaffected."""
        k = self._check_k(k)
        if isinstance(histories, (str, bytes)) or not isinstance(histories, (Sequence, np.ndarray)):
            raise LlamarecError("histories must be a list of histories")
        results: list[RecommendResult | None] = [None] * len(histories)
        dense, rows = [], []
        for row, hist in enumerate(histories):
            try:
                dense.append(self.resolve_history(hist))
                rows.append(row)
            except LlamarecError as exc:
                results[row] = RecommendResult([], 0.0, 0.0, error=str(exc))
        if dense:
            for row, result in zip(rows, self._recommend_resolved(dense, k)):
                results[row] = result
        return results  # type: ignore[return-value]

    def _recommend_resolved(self, dense: list[np.ndarray], k: int) -> list[RecommendResult]:
        start = time.perf_counter()
        items, ret_scores = self.retrieve(dense)
        retrieval_ms = (time.perf_counter() - start) * 1000 / len(dense)
        start = time.perf_counter()
        llm, final = self.rerank(dense, items, ret_scores)
        ranking_ms = (time.perf_counter() - start) * 1000 / len(dense)
        cat, results = self.catalogue, []
        for row, hist in enumerate(dense):
            order = torch.argsort(final[row], descending=True, stable=True)[:k].tolist()
            results.append(RecommendResult([
                Recommendation(cat.raw_ids[items[row, j]], cat.titles[items[row, j]], float(final[row, j]),
                               float(ret_scores[row, j]), None if llm is None else float(llm[row, j]))
                for j in order], retrieval_ms, ranking_ms, history=[cat.raw_ids[i] for i in hist]))
        return results


def _catalogue(retriever_dir: Path, n_items: int | None = None) -> Catalogue:
    """The run's item catalogue (checked against the manifest), which must describe the
    retriever's ``n_items`` items when that is given."""
    from llamarec.manifest import verify

    path = retriever_dir / CATALOGUE_FILE
    if not path.is_file():
        # A run trained before runs carried their catalogue: build it once from the dataset.
        from llamarec.data import load_run_dataset

        ds = load_run_dataset(retriever_dir)
        Catalogue(ds.item_raw_ids, ds.titles).save(path)
        logger.info("wrote the item catalogue of %s", retriever_dir)
    verify(retriever_dir, CATALOGUE_FILE)
    catalogue = Catalogue.load(path)
    if n_items is not None and catalogue.n_items != n_items:
        raise LlamarecError(f"{path}: {catalogue.n_items} items, but the retriever scores {n_items} "
                            "(a catalogue of another run?)")
    return catalogue


def _n_candidates(retriever_dir: Path, n_items: int) -> int:
    """The number of candidates the ranker was trained and tuned on (``k`` of the run's
    candidates), 20 when the run has no candidates summary."""
    from llamarec.configs import read_json_file
    from llamarec.manifest import verify

    path = retriever_dir / CANDIDATES_SUMMARY
    verify(retriever_dir, CANDIDATES_SUMMARY)
    if not path.is_file():
        return 20
    k = read_json_file(path).get("k")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_items:
        raise LlamarecError(f"{path}: k is {k!r}; expected the number of candidates, 1 to {n_items}")
    return k


def _scoring(run_dir: Path) -> ScoringConfig:
    """How the run's evaluation scored (order, permutations, letter prior, fusion weight); a
    run not evaluated yet is served in the retriever's order, fused as it was trained."""
    from llamarec.configs import read_json_file, validate
    from llamarec.manifest import verify

    path = run_dir / PIPELINE_METRICS
    verify(run_dir, PIPELINE_METRICS)
    if path.is_file():
        ranker = read_json_file(path).get("ranker", {})
        if not isinstance(ranker, dict):
            raise LlamarecError(f"{path}: ranker: expected a mapping (an edited or damaged file)")
        if "scoring" in ranker:
            return validate(ScoringConfig, ranker["scoring"], f"{path}: ranker.scoring")
        fusion = ranker.get("fusion", {})
        weight = fusion.get("weight", float("inf")) if isinstance(fusion, dict) else None
        return validate(ScoringConfig, {"fusion_weight": weight}, f"{path}: ranker.fusion.weight")
    train = run_dir / RANKER_DIR / RANK_TRAIN_METRICS
    verify(train.parent, RANK_TRAIN_METRICS)
    if train.is_file():
        metrics = read_json_file(train)
        temperatures = metrics.get("retriever_temperatures") or {}
        if isinstance(temperatures, dict) and "val" in temperatures:
            return validate(ScoringConfig, {"fusion_weight": metrics.get("residual_weight"),
                                            "ranker_scale": metrics.get("ranker_scale", 1.0),
                                            "retriever_temperature": temperatures["val"]}, str(train))
    return ScoringConfig()
