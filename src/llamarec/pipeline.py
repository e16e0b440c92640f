"""The two-stage recommender: retriever top-k, then the LLM ranker, then fusion.

:class:`Recommender` is the one object the CLI, the Python API and evaluation of new histories
use; it composes the same retrieval (:func:`~llamarec.retrieval.evaluate.top_k`) and ranking
(:class:`~llamarec.ranking.ranker.Ranker`) code that training and evaluation use.
"""

from __future__ import annotations

import difflib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llamarec.data.dataset import Dataset
from llamarec.errors import LlamarecError
from llamarec.ranking.examples import RankExample
from llamarec.retrieval.evaluate import top_k
from llamarec.retrieval.models.base import SequentialRecommender
from llamarec.retrieval.train import load_retriever

RETRIEVER_DIR, RANKER_DIR, METRICS_FILE = "retriever", "ranker", "metrics.json"


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


class Recommender:
    """Retriever + optional LLM ranker + item catalogue, loaded from a run directory."""

    def __init__(self, retriever: SequentialRecommender, max_len: int, dataset: Dataset,
                 ranker=None, fusion_weight: float = float("inf"), n_candidates: int = 20) -> None:
        self.retriever, self.max_len, self.ds = retriever.eval(), max_len, dataset
        self.ranker, self.fusion_weight, self.n_candidates = ranker, fusion_weight, n_candidates
        self._by_raw_id = {raw: i for i, raw in enumerate(dataset.item_raw_ids) if i > 0}
        self._by_title: dict[str, list[int]] = {}
        for i, title in enumerate(dataset.titles[1:], 1):
            self._by_title.setdefault(title.casefold(), []).append(i)

    @classmethod
    def load(cls, run_dir: str | Path, *, with_ranker: bool = True) -> Recommender:
        """Load ``run_dir`` written by ``llamarec run`` (or a bare retriever run directory)."""
        run_dir = Path(run_dir)
        retriever_dir = run_dir / RETRIEVER_DIR if (run_dir / RETRIEVER_DIR).is_dir() else run_dir
        model, cfg, ds = load_retriever(retriever_dir)
        ranker, weight, n_candidates = None, float("inf"), 20
        if with_ranker and (run_dir / RANKER_DIR / "adapter").is_dir():
            ranker = _load_ranker(run_dir / RANKER_DIR, ds)
            weight = _fusion_weight(run_dir)
            # The ranker was fine-tuned, and the fusion weight tuned, on the run's top-k candidates.
            candidates = retriever_dir / "candidates.json"
            if candidates.is_file():
                n_candidates = int(json.loads(candidates.read_text())["k"])
        return cls(model, cfg.max_len, ds, ranker, weight, n_candidates)

    # -- history resolution ---------------------------------------------------------------------
    def resolve_item(self, entry: int | str) -> int:
        """Dense id of a history entry: a raw item id, an exact title, or an unambiguous
        case-insensitive title."""
        key = str(entry).strip()
        if key in self._by_raw_id:
            return self._by_raw_id[key]
        exact = [i for i in self._by_title.get(key.casefold(), []) if self.ds.titles[i] == key]
        matches = exact or self._by_title.get(key.casefold(), [])
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            ids = ", ".join(self.ds.item_raw_ids[i] for i in matches)
            raise LlamarecError(f"history item {key!r} matches several items (ids {ids}); give an id")
        close = difflib.get_close_matches(key, [t for t in self.ds.titles[1:]], n=5, cutoff=0.6)
        hint = f"; close matches: {'; '.join(close)}" if close else ""
        raise LlamarecError(f"history item {key!r} is neither an item id nor a title of {self.ds.name}{hint}")

    # -- recommendation -------------------------------------------------------------------------
    def recommend(self, history: Sequence[int | str], k: int = 10) -> RecommendResult:
        return self.recommend_batch([history], k)[0]

    def recommend_batch(self, histories: Sequence[Sequence[int | str]], k: int = 10) -> list[RecommendResult]:
        """Recommend ``k`` items for each history; the ranker scores all histories in one
        batched pass."""
        if not 1 <= k <= self.n_candidates:
            raise LlamarecError(f"k={k}: must be between 1 and the number of candidates ({self.n_candidates})")
        if not histories:
            return []
        dense = []
        for hist in histories:
            if not hist:
                raise LlamarecError("a history needs at least one item")
            dense.append(np.array([self.resolve_item(e) for e in hist], dtype=np.int64))
        start = time.perf_counter()
        items, ret_scores = top_k(self.retriever, dense, self.n_candidates, self.max_len)
        retrieval_ms = (time.perf_counter() - start) * 1000 / len(dense)
        start = time.perf_counter()
        ret = torch.from_numpy(ret_scores)
        if self.ranker is not None:
            from llamarec.ranking.evaluate import fuse

            examples = [RankExample(-1, tuple(h[-self.ranker.builder.config.max_history:].tolist()),
                                    tuple(int(i) for i in row), 0) for h, row in zip(dense, items)]
            llm = self.ranker.score(examples)
            final = fuse(llm, ret, self.fusion_weight)
        else:
            llm, final = None, ret
        ranking_ms = (time.perf_counter() - start) * 1000 / len(dense)
        results = []
        for row in range(len(dense)):
            order = torch.argsort(final[row], descending=True)[:k].tolist()
            results.append(RecommendResult([
                Recommendation(self.ds.item_raw_ids[items[row, j]], self.ds.titles[items[row, j]],
                               float(final[row, j]), float(ret[row, j]),
                               None if llm is None else float(llm[row, j]))
                for j in order], retrieval_ms, ranking_ms))
        return results


def _load_ranker(rank_dir: Path, ds: Dataset):
    from peft import PeftModel

    from llamarec.ranking.config import RankConfig
    from llamarec.ranking.finetune import ADAPTER_DIR, CONFIG_FILE
    from llamarec.ranking.llm import load_llm
    from llamarec.ranking.prompt import PromptConfig
    from llamarec.ranking.ranker import Ranker

    cfg = RankConfig.model_validate(json.loads((rank_dir / CONFIG_FILE).read_text()))
    model, tokenizer = load_llm(cfg.model, dtype=cfg.dtype, device=cfg.device,
                                load_in_4bit=cfg.load_in_4bit, gguf_file=cfg.gguf_file)
    model = PeftModel.from_pretrained(model, rank_dir / ADAPTER_DIR).eval()
    prompt_cfg = PromptConfig.from_file(cfg.prompt_file) if cfg.prompt_file else PromptConfig()
    return Ranker(model, tokenizer, ds.titles, prompt_cfg, cfg.eval_batch_size)


def _fusion_weight(run_dir: Path) -> float:
    """The fusion weight tuned on validation users by the run's evaluation (retriever order if
    the run was not evaluated)."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return float("inf")
    return float(json.loads(path.read_text()).get("ranker", {}).get("fusion", {}).get("weight", float("inf")))
