"""Evaluating the ranker against the retriever, the paper's way and with fusion.

For the users whose target is among the retriever's candidates (the valid subset) the ranker
reorders the candidates; "overall" metrics combine the ranker's metrics on that subset with
the retriever's on the other users, weighted by their sizes. Scores come from
:meth:`Ranker.rerank <llamarec.ranking.ranker.Ranker.rerank>`, the path serving uses, and the
fusion weight is tuned on validation users only (a residually trained ranker keeps the weight
it was trained with). Paired differences to the retriever come with 95 % bootstrap intervals.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from llamarec.candidates import Candidates, load_candidates
from llamarec.data import load_run_dataset
from llamarec.errors import LlamarecError
from llamarec.io import atomic_path, write_json
from llamarec.layout import EVAL_METRICS, EVAL_RANKS
from llamarec.manifest import record
from llamarec.metrics import metrics_from_ranks, overall_metrics, paired_bootstrap, per_user_metric, target_ranks
from llamarec.ranking.config import verify_ranker_run
from llamarec.ranking.examples import RankExample, evaluation_examples
from llamarec.ranking.ranker import Ranker, load_ranker, read_rank_config, read_ranker_scale
from llamarec.ranking.scoring import (
    KS,
    Order,
    ScoringConfig,
    estimate_letter_prior,
    fit_temperature,
    fuse,
    tune_fusion,
)
from llamarec.ranking.verbalizer import seeded_orders

COMPARED = ("NDCG@10", "Recall@10", "MRR@10")


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


def comparisons(cands: Candidates, ranks: dict[str, torch.Tensor], seed: int = 0) -> dict[str, dict]:
    """Paired differences to the retriever with 95 % bootstrap intervals over users.

    Outside the valid subset every method has the retriever's metrics, so there the difference
    is exactly 0: the overall difference (and its interval) is the valid subset's scaled by the
    share of valid users."""
    share = float(cands.valid().mean())
    out: dict[str, dict] = {}
    for name in ("ranker", "fusion"):
        per_view: dict[str, dict] = {"valid_subset": {}, "overall": {}}
        for metric in COMPARED:
            sub = paired_bootstrap(per_user_metric(ranks[name], metric), per_user_metric(ranks["retriever"], metric),
                                   seed=seed)
            per_view["valid_subset"][metric] = sub
            per_view["overall"][metric] = {k: v * share for k, v in sub.items()}
        out[f"{name}_vs_retriever"] = per_view
    return out


def letter_prior(ranker: Ranker, examples: list[RankExample], seed: int) -> list[float]:
    """The ranker's letter prior, estimated on ``examples`` shown in a random order."""
    n = len(examples[0].candidates)
    shuffled = seeded_orders(n, 2, seed + 1)[1]
    return estimate_letter_prior(ranker.shown_scores(examples, [shuffled])[0])


def evaluate_ranker(rank_dir: Path, *, zero_shot: bool = False, order: Order = "retriever",
                    permutations: int = 3, limit: int | None = None, out: Path | None = None,
                    seed: int = 0, dtype: str | None = None, calibrate: bool = False) -> dict:
    """Score validation and test valid-subset users, tune fusion on validation, write
    ``metrics.json`` (with the :class:`ScoringConfig` to serve the ranker with) and
    ``ranks.csv`` (one row per evaluated user and split) into ``out``.

    ``limit`` scores only the first ``limit`` valid users of each split (the same users for
    every method), for quick runs; ``dtype`` overrides the run's dtype (e.g. to compare
    bfloat16 with float32 scoring); ``calibrate`` subtracts the letter prior estimated on the
    validation users.
    """
    verify_ranker_run(rank_dir, adapter=not zero_shot)
    cfg = read_rank_config(rank_dir)
    ds = load_run_dataset(cfg.retriever)
    ranker = load_ranker(rank_dir, ds.titles, zero_shot=zero_shot, dtype=dtype)
    max_history = ranker.builder.config.max_history
    examples = {}
    for split in ("val", "test"):
        examples[split] = evaluation_examples(ds, load_candidates(cfg.retriever, split), split,
                                              max_history=max_history, limit=limit)
        if not examples[split]:
            raise LlamarecError(f"{cfg.retriever}: no {split} user has the target among the candidates")
    all_val = evaluation_examples(ds, load_candidates(cfg.retriever, "val"), "val", max_history=max_history)
    residual = not zero_shot and cfg.residual_weight > 0
    scoring = ScoringConfig(
        order=order, permutations=permutations if order == "average" else 1, seed=seed,
        ranker_scale=read_ranker_scale(rank_dir) if residual else 1.0,
        letter_prior=letter_prior(ranker, examples["val"], seed) if calibrate else None,
        retriever_temperature=fit_temperature(_retriever_scores(all_val), _labels(all_val)))
    llm = {split: ranker.rerank([ex.history for ex in exs], torch.tensor([ex.candidates for ex in exs]).numpy(),
                                _retriever_scores(exs).numpy(), scoring)[0]
           for split, exs in examples.items()}
    val = examples["val"]
    tuned, grid = tune_fusion(scoring.ranker_scale * llm["val"], _retriever_scores(val), _labels(val),
                              scoring.retriever_temperature)
    scoring.fusion_weight = cfg.residual_weight if residual else tuned
    results: dict = {"ranker": str(rank_dir), "zero_shot": zero_shot, "order": order,
                     "dtype": str(next(ranker.model.parameters()).dtype).removeprefix("torch."),
                     "permutations": scoring.permutations, "calibrated": calibrate}
    rows = []
    for split, exs in examples.items():
        cands = load_candidates(cfg.retriever, split)
        ret, labels = _retriever_scores(exs), _labels(exs)
        ranks = {"retriever": target_ranks(ret, labels), "ranker": target_ranks(llm[split], labels),
                 "fusion": target_ranks(fuse(scoring.ranker_scale * llm[split], ret, scoring.fusion_weight,
                                             scoring.retriever_temperature), labels)}
        results[split] = {"users": len(cands.ranks), "valid_subset_users": int(cands.valid().sum()),
                          "evaluated_users": len(exs), **_views(cands, ranks),
                          "comparisons": comparisons(cands, ranks, seed)}
        full_ranks = cands.ranks[[ex.user for ex in exs]]
        rows += [{"split": split, "user": ex.user, "user_raw_id": ds.user_raw_ids[ex.user],
                  "target_item": ex.candidates[ex.target], "retriever_full_rank": int(full_ranks[i]),
                  **{f"{name}_rank": int(r[i]) for name, r in ranks.items()}}
                 for i, ex in enumerate(exs)]
    results["fusion"] = {"weight": scoring.fusion_weight,
                         "chosen_by": "residual training" if residual else "validation NDCG@10",
                         "val_NDCG@10_by_weight": {str(k): v for k, v in grid.items()}}
    results["scoring"] = scoring.model_dump()
    out = out or rank_dir / (f"eval-{'zero-shot' if zero_shot else 'finetuned'}-{order}"
                             + ("-calibrated" if calibrate else "") + (f"-{dtype}" if dtype else "")
                             + (f"-limit{limit}" if limit else ""))
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / EVAL_METRICS, results)
    record(out, out / EVAL_METRICS)
    with atomic_path(out / EVAL_RANKS) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    record(out, out / EVAL_RANKS)
    return results
