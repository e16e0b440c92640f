"""Evaluating the ranker against the retriever, the paper's way and with fusion.

For the users whose target is among the retriever's candidates (the valid subset) the ranker
reorders the candidates; "overall" metrics combine the ranker's metrics on that subset with
the retriever's on the other users, weighted by their sizes. Fusion adds the retriever's
(log-softmax) score to the ranker's with a weight tuned on validation users; the grid includes
the retriever alone, so on validation the fused ranking is never worse than the retriever's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import pandas as pd
import torch

from llamarec.errors import LlamarecError
from llamarec.io import atomic_path, write_json
from llamarec.metrics import metrics_from_ranks, overall_metrics, target_ranks
from llamarec.ranking.config import RankConfig
from llamarec.ranking.examples import RankExample, evaluation_examples
from llamarec.ranking.finetune import ADAPTER_DIR, CONFIG_FILE
from llamarec.ranking.llm import load_llm
from llamarec.ranking.prompt import PromptConfig
from llamarec.ranking.ranker import Ranker
from llamarec.retrieval.candidates import Candidates, load_candidates
from llamarec.retrieval.train import load_retriever

KS = (1, 5, 10)
FUSION_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, float("inf"))
EvalOrder = Literal["retriever", "shuffled", "average"]


def fuse(llm: torch.Tensor, retriever: torch.Tensor, weight: float) -> torch.Tensor:
    """Ranker log-probabilities plus ``weight`` x retriever log-probabilities over the candidates.
    ``inf`` means the retriever's order, with the ranker only breaking ties."""
    llm_lp, ret_lp = llm.log_softmax(-1), retriever.log_softmax(-1)
    if weight == float("inf"):
        return ret_lp + 1e-6 * llm_lp
    return llm_lp + weight * ret_lp


def tune_fusion(llm: torch.Tensor, retriever: torch.Tensor, labels: torch.Tensor,
                metric: str = "NDCG@10") -> tuple[float, dict[float, float]]:
    """The weight of :data:`FUSION_WEIGHTS` with the best ``metric``; ties go to the larger
    weight (closer to the retriever)."""
    results = {w: metrics_from_ranks(target_ranks(fuse(llm, retriever, w), labels), KS)[metric]
               for w in FUSION_WEIGHTS}
    best = max(results.values())
    return max(w for w, v in results.items() if v >= best - 1e-12), results


def _labels(examples: list[RankExample]) -> torch.Tensor:
    return torch.tensor([ex.target for ex in examples])


def _retriever_scores(examples: list[RankExample]) -> torch.Tensor:
    return torch.tensor([ex.retriever_scores for ex in examples], dtype=torch.float32)


def _views(cands: Candidates, ranks: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Valid-subset and overall metrics for each method's ranks within the candidates.

    ``ranks`` may cover only a sample of the valid subset (``--limit``): its metrics then
    estimate the subset's, and the overall view still weights them by the whole subset's size.
    """
    valid = cands.valid()
    rest = metrics_from_ranks(torch.from_numpy(cands.ranks[~valid]), KS)
    out: dict[str, dict] = {"valid_subset": {}, "overall": {}}
    for name, r in ranks.items():
        subset = metrics_from_ranks(r, KS)
        out["valid_subset"][name] = subset
        out["overall"][name] = overall_metrics(subset, int(valid.sum()), rest, int((~valid).sum()))
    return out


def evaluate_ranker(rank_dir: Path, *, zero_shot: bool = False, order: EvalOrder = "retriever",
                    permutations: int = 3, limit: int | None = None, out: Path | None = None,
                    seed: int = 0, dtype: str | None = None) -> dict:
    """Score validation and test valid-subset users, tune fusion on validation, write
    ``metrics.json`` and ``ranks.csv`` (one row per evaluated user and split) into ``out``.

    ``limit`` scores only the first ``limit`` valid users of each split (the same users for
    every method), for quick runs on a CPU; ``dtype`` overrides the run's dtype (e.g. to
    compare bfloat16 with float32 scoring).
    """
    path = rank_dir / CONFIG_FILE
    if not path.is_file():
        raise LlamarecError(f"{rank_dir}: not a ranker run ({CONFIG_FILE} missing)")
    cfg = RankConfig.model_validate(json.loads(path.read_text()))
    _, _, ds = load_retriever(cfg.retriever)
    model, tokenizer = load_llm(cfg.model, dtype=dtype or cfg.dtype, device=cfg.device,
                                load_in_4bit=cfg.load_in_4bit, gguf_file=cfg.gguf_file)
    if not zero_shot:
        from peft import PeftModel

        if not (rank_dir / ADAPTER_DIR).is_dir():
            raise LlamarecError(f"{rank_dir}: no adapter saved yet; train first or pass --zero-shot")
        model = PeftModel.from_pretrained(model, rank_dir / ADAPTER_DIR).eval()
    prompt_cfg = PromptConfig.from_file(cfg.prompt_file) if cfg.prompt_file else PromptConfig()
    ranker = Ranker(model, tokenizer, ds.titles, prompt_cfg, cfg.eval_batch_size)
    example_order = "retriever" if order == "retriever" else "shuffled"
    results: dict = {"ranker": str(rank_dir), "zero_shot": zero_shot, "order": order,
                     "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                     "permutations": permutations if order == "average" else 1}
    scored = {}
    for split in ("val", "test"):
        cands = load_candidates(cfg.retriever, split)
        examples = evaluation_examples(ds, cands, split, order=example_order,
                                       max_history=prompt_cfg.max_history, seed=seed, limit=limit)
        if not examples:
            raise LlamarecError(f"{cfg.retriever}: no {split} user has the target among the candidates")
        llm = ranker.score(examples, permutations if order == "average" else 1, seed)
        scored[split] = (cands, examples, llm, _retriever_scores(examples), _labels(examples))
    weight, grid = tune_fusion(*scored["val"][2:])
    rows = []
    for split, (cands, examples, llm, ret, labels) in scored.items():
        ranks = {"retriever": target_ranks(ret, labels), "ranker": target_ranks(llm, labels),
                 "fusion": target_ranks(fuse(llm, ret, weight), labels)}
        results[split] = {"users": len(cands.ranks), "valid_subset_users": int(cands.valid().sum()),
                          "evaluated_users": len(examples),
                          **_views(cands, ranks)}
        full_ranks = cands.ranks[[ex.user for ex in examples]]
        rows += [{"split": split, "user": ex.user, "user_raw_id": ds.user_raw_ids[ex.user],
                  "target_item": ex.candidates[ex.target], "retriever_full_rank": int(full_ranks[i]),
                  **{f"{name}_rank": int(r[i]) for name, r in ranks.items()}}
                 for i, ex in enumerate(examples)]
    results["fusion"] = {"weight": weight, "val_NDCG@10_by_weight": {str(k): v for k, v in grid.items()}}
    out = out or rank_dir / (f"eval-{'zero-shot' if zero_shot else 'finetuned'}-{order}"
                             + (f"-{dtype}" if dtype else "") + (f"-limit{limit}" if limit else ""))
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", results)
    with atomic_path(out / "ranks.csv") as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    return results
