"""Evaluating the ranker against the retriever, the paper's way and with fusion.

For the users whose target is among the retriever's candidates (the valid subset) the ranker
reorders the candidates; "overall" metrics combine the ranker's metrics on that subset with
the retriever's on the other users, weighted by their sizes. Scores come from
:meth:`Ranker.rerank <llamarec.ranking.ranker.Ranker.rerank>`, the path serving uses, and the
fusion weight is tuned on validation users only (a residually trained ranker keeps the weight
it was trained with). Paired differences to the retriever come with 95 % bootstrap intervals.

The ranker's letter scores, the expensive part, go through one of batch scoring's engines:
``local`` in this process, or ``ray`` on a Ray Data actor pool
(:func:`llamarec.score_ray.rerank_ray`) whose actors load the ranker from the run directory.
The users are planned into chunks first (:func:`plan_chunks`) and both engines rerank exactly
these chunks, so their results are identical; the rest (fusion, metrics, intervals) runs here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from llamarec.candidates import Candidates, load_candidates
from llamarec.checkpoint import load_tensors, save_tensors
from llamarec.data import load_run_dataset
from llamarec.errors import LlamarecError
from llamarec.io import atomic_path, write_json
from llamarec.layout import EVAL_METRICS, EVAL_RANKS, MANIFEST_FILE
from llamarec.manifest import record
from llamarec.metrics import metrics_from_ranks, overall_metrics, paired_bootstrap, per_user_metric, target_ranks
from llamarec.ranking.config import RankConfig, verify_ranker_run
from llamarec.ranking.examples import RankExample, evaluation_examples
from llamarec.ranking.ranker import Ranker, load_ranker, read_prompt_config, read_rank_config, read_ranker_scale
from llamarec.ranking.scoring import (
    KS,
    Order,
    ScoringConfig,
    estimate_letter_prior,
    fit_temperature,
    fuse,
    tune_fusion,
)
from llamarec.ranking.title_similarity import TitleSimilarityRanker
from llamarec.ranking.verbalizer import seeded_orders

COMPARED = ("NDCG@10", "Recall@10", "MRR@10")
PARTIAL_PREFIX = "partial-"  # letter scores of an evaluation in progress (PartialScores)


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


# --------------------------------------------------------------------------- letter scores
def plan_chunks(examples: Sequence[RankExample], titles: Sequence[str], batch_size: int) -> list[list[int]]:
    """Positions of ``examples`` in chunks of ``batch_size``, longest prompt (in characters of
    the titles it shows) first, so a chunk pads little. Each chunk is one ``Ranker.rerank`` call,
    whichever engine runs it: a batch's composition changes scores in the last digits."""
    sizes = [sum(len(titles[i]) for i in (*ex.history, *ex.candidates)) for ex in examples]
    order = sorted(range(len(examples)), key=lambda i: -sizes[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def rerank_chunk(ranker: Ranker | TitleSimilarityRanker, examples: Sequence[Sequence],
                 scoring: ScoringConfig) -> torch.Tensor:
    """The letter scores ``[len(examples), n]`` of ``(history, candidates, retriever scores)``
    examples, by :meth:`Ranker.rerank`; the one call of both engines."""
    histories, candidates, retriever = zip(*examples)
    return ranker.rerank([list(h) for h in histories], np.asarray(candidates, dtype=np.int64),
                         np.asarray(retriever, dtype=np.float32), scoring)[0]


def _plain(ex: RankExample) -> tuple[list[int], list[int], list[float]]:
    return list(ex.history), list(ex.candidates), list(ex.retriever_scores)


class PartialScores:
    """The letter scores of the chunks scored so far, saved after each one, so that an
    interrupted evaluation resumes where it stopped instead of starting again.

    They live in ``directory`` as ``partial-<key>.safetensors`` (one tensor per chunk), the key
    a hash of everything the scores depend on: the ranker run's manifest (its adapter's
    checksums), the options it is loaded with, the scoring config, the examples and their
    chunks. A file with another key is another call's; an unreadable one is started afresh."""

    def __init__(self, directory: Path, identity: dict, examples: Sequence[RankExample],
                 chunks: list[list[int]], scoring: ScoringConfig) -> None:
        blob = json.dumps([identity, scoring.model_dump(), [_plain(ex) for ex in examples], chunks], sort_keys=True)
        self.path = directory / f"{PARTIAL_PREFIX}{hashlib.sha256(blob.encode()).hexdigest()[:16]}.safetensors"
        self.meta: dict = {}

    def load(self) -> dict[int, torch.Tensor]:
        if not self.path.is_file():
            return {}
        try:
            tensors, self.meta = load_tensors(self.path)
        except LlamarecError as exc:
            warnings.warn(f"{exc}; scoring its chunks again", stacklevel=2)
            return {}
        return {int(k): v for k, v in tensors.items()}

    def save(self, done: dict[int, torch.Tensor], dtype: str | None) -> None:
        save_tensors(self.path, {str(k): v for k, v in done.items()}, {"dtype": dtype})


def remove_partial_scores(directory: Path) -> None:
    for path in directory.glob(f"{PARTIAL_PREFIX}*.safetensors"):
        path.unlink(missing_ok=True)


class ChunkedScores:
    """Letter scores of evaluation examples, planned into chunks (:func:`plan_chunks`) that an
    engine reranks; with ``resume_dir``, done chunks are saved and not scored again."""

    titles: Sequence[str]
    batch_size: int
    identity: dict
    dtype: str | None

    def __init__(self, resume_dir: Path | None) -> None:
        self.resume_dir = resume_dir

    def run(self, todo: list[tuple[int, list[RankExample]]],
            scoring: ScoringConfig) -> Iterator[tuple[int, torch.Tensor]]:
        """``(chunk index, its letter scores)`` for each chunk of ``todo``, as they are done."""
        raise NotImplementedError

    def __call__(self, examples: Sequence[RankExample], scoring: ScoringConfig) -> torch.Tensor:
        chunks = plan_chunks(examples, self.titles, self.batch_size)
        partial = None if self.resume_dir is None else PartialScores(self.resume_dir, self.identity, examples,
                                                                     chunks, scoring)
        done = partial.load() if partial else {}
        if done and self.dtype is None:
            self.dtype = partial.meta.get("dtype")
        todo = [(i, [examples[p] for p in chunk]) for i, chunk in enumerate(chunks) if i not in done]
        for i, scores in self.run(todo, scoring):
            done[i] = scores
            if partial:
                partial.save(done, self.dtype)
        out = torch.empty(len(examples), len(examples[0].candidates))
        for i, chunk in enumerate(chunks):
            out[chunk] = done[i]
        return out


class LocalScores(ChunkedScores):
    """Letter scores of evaluation examples in this process (engine ``local``)."""

    def __init__(self, ranker: Ranker | TitleSimilarityRanker, resume_dir: Path | None = None,
                 identity: dict | None = None) -> None:
        super().__init__(resume_dir)
        self.ranker, self.dtype, self.identity = ranker, ranker.dtype_name, identity or {}
        self.titles, self.batch_size = ranker.titles, ranker.batch_size

    def run(self, todo: list[tuple[int, list[RankExample]]],
            scoring: ScoringConfig) -> Iterator[tuple[int, torch.Tensor]]:
        for i, chunk in todo:
            yield i, rerank_chunk(self.ranker, [_plain(ex) for ex in chunk], scoring)


class RayScores(ChunkedScores):
    """Letter scores of evaluation examples on a Ray Data actor pool (engine ``ray``); the
    driver never loads the ranker, every actor loads it from ``rank_dir``. The chunks left to
    score go to the actors in one call, so they are saved for resuming when it returns."""

    def __init__(self, rank_dir: Path, titles: Sequence[str], cfg: RankConfig, *, zero_shot: bool,
                 dtype: str | None, workers: int, resume_dir: Path | None = None,
                 identity: dict | None = None) -> None:
        super().__init__(resume_dir)
        device = cfg.scoring_device()  # "auto" is decided by the cluster (score_ray.actor_device)
        self.rank_dir, self.titles, self.batch_size = rank_dir, titles, cfg.scoring_batch_size()
        self.options = {"zero_shot": zero_shot, "dtype": dtype, "device": device, "workers": workers}
        self.identity = identity or {}
        self.dtype = None  # known once the actors have loaded the ranker

    def run(self, todo: list[tuple[int, list[RankExample]]],
            scoring: ScoringConfig) -> Iterator[tuple[int, torch.Tensor]]:
        from llamarec.score_ray import rerank_ray

        if not todo:
            return
        flat = [ex for _, chunk in todo for ex in chunk]
        bounds = np.cumsum([0] + [len(chunk) for _, chunk in todo])
        chunks = [list(range(a, b)) for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist())]
        scores, self.dtype = rerank_ray(self.rank_dir, [_plain(ex) for ex in flat], chunks, scoring,
                                        titles=self.titles, **self.options)
        for (i, _), positions in zip(todo, chunks):
            yield i, scores[positions]


@contextlib.contextmanager
def letter_scores(engine: str, rank_dir: Path, titles: Sequence[str], cfg: RankConfig, *, zero_shot: bool,
                  dtype: str | None, workers: int, address: str | None,
                  resume_dir: Path | None = None) -> Iterator[LocalScores | RayScores]:
    """The engine's scorer; with ray, one cluster (joined or started) for all its calls. With
    ``resume_dir`` the scores of done chunks are kept there (see :class:`PartialScores`)."""
    identity = {"ranker": _run_fingerprint(rank_dir), "zero_shot": zero_shot, "dtype": dtype}
    if engine == "local":
        yield LocalScores(load_ranker(rank_dir, titles, zero_shot=zero_shot, dtype=dtype), resume_dir, identity)
        return
    from llamarec.score_ray import session

    with session(workers, address):
        yield RayScores(rank_dir, titles, cfg, zero_shot=zero_shot, dtype=dtype, workers=workers,
                        resume_dir=resume_dir, identity=identity)


def _run_fingerprint(rank_dir: Path) -> str:
    """A hash of the ranker run's manifest (its files' checksums, the adapter's included)."""
    manifest = Path(rank_dir) / MANIFEST_FILE
    return hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else ""


def letter_prior(scores: Ranker | LocalScores | RayScores, examples: list[RankExample], seed: int) -> list[float]:
    """The ranker's letter prior, estimated on ``examples`` shown in a random order (scored as
    examples whose candidates come in that order)."""
    if isinstance(scores, Ranker):
        scores = LocalScores(scores)
    shuffled = seeded_orders(len(examples[0].candidates), 2, seed + 1)[1]
    shown = [dataclasses.replace(ex, candidates=tuple(ex.candidates[i] for i in shuffled),
                                 retriever_scores=tuple(ex.retriever_scores[i] for i in shuffled),
                                 target=shuffled.index(ex.target)) for ex in examples]
    return estimate_letter_prior(scores(shown, ScoringConfig()))


# --------------------------------------------------------------------------- evaluation
def evaluate_ranker(rank_dir: Path, *, zero_shot: bool = False, order: Order = "retriever",
                    permutations: int = 3, limit: int | None = None, out: Path | None = None,
                    seed: int = 0, dtype: str | None = None, calibrate: bool = False,
                    engine: str = "local", workers: int = 1, address: str | None = None) -> dict:
    """Score validation and test valid-subset users, tune fusion on validation, write
    ``metrics.json`` (with the :class:`ScoringConfig` to serve the ranker with) and
    ``ranks.csv`` (one row per evaluated user and split) into ``out``.

    ``limit`` scores only the first ``limit`` valid users of each split (the same users for
    every method), for quick runs; ``dtype`` overrides the run's dtype (e.g. to compare
    bfloat16 with float32 scoring); ``calibrate`` subtracts the letter prior estimated on the
    validation users. ``engine`` ``ray`` scores the users on ``workers`` Ray actors, on the
    cluster of ``address`` (or ``RAY_ADDRESS``) or on a local one; the results are the same.
    """
    from llamarec.score import check_engine

    check_engine(engine, workers)
    verify_ranker_run(rank_dir, adapter=not zero_shot)
    cfg = read_rank_config(rank_dir)
    similarity = cfg.kind == "title_similarity"
    if similarity and (zero_shot or calibrate or order != "retriever" or dtype is not None):
        raise LlamarecError(f"{rank_dir}: a title_similarity ranker reads no prompt and runs in float32, so "
                            "zero-shot, --calibrate, --dtype and candidate orders other than the retriever's do "
                            "not apply to it")
    ds = load_run_dataset(cfg.retriever)
    max_history = read_prompt_config(rank_dir, cfg).max_history
    examples = {}
    for split in ("val", "test"):
        examples[split] = evaluation_examples(ds, load_candidates(cfg.retriever, split), split,
                                              max_history=max_history, limit=limit)
        if not examples[split]:
            raise LlamarecError(f"{cfg.retriever}: no {split} user has the target among the candidates")
    all_val = evaluation_examples(ds, load_candidates(cfg.retriever, "val"), "val", max_history=max_history)
    residual = not zero_shot and cfg.residual_weight > 0
    kind = "title-similarity" if similarity else "zero-shot" if zero_shot else "finetuned"
    out = out or rank_dir / (f"eval-{kind}-{order}"
                             + ("-calibrated" if calibrate else "") + (f"-{dtype}" if dtype else "")
                             + (f"-limit{limit}" if limit else ""))
    out.mkdir(parents=True, exist_ok=True)
    with letter_scores(engine, rank_dir, ds.titles, cfg, zero_shot=zero_shot, dtype=dtype, workers=workers,
                       address=address, resume_dir=out) as scores:
        scoring = ScoringConfig(
            order=order, permutations=permutations if order == "average" else 1, seed=seed,
            ranker_scale=cfg.similarity_scale if similarity else read_ranker_scale(rank_dir) if residual else 1.0,
            letter_prior=letter_prior(scores, examples["val"], seed) if calibrate else None,
            retriever_temperature=fit_temperature(_retriever_scores(all_val), _labels(all_val)))
        both = scores(examples["val"] + examples["test"], scoring)
    val = examples["val"]
    llm = {"val": both[:len(val)], "test": both[len(val):]}
    tuned, grid = tune_fusion(scoring.ranker_scale * llm["val"], _retriever_scores(val), _labels(val),
                              scoring.retriever_temperature)
    scoring.fusion_weight = cfg.residual_weight if residual else tuned
    results: dict = {"ranker": str(rank_dir), "zero_shot": zero_shot, "order": order,
                     "dtype": scores.dtype,
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
    write_json(out / EVAL_METRICS, results)
    record(out, out / EVAL_METRICS)
    with atomic_path(out / EVAL_RANKS) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    record(out, out / EVAL_RANKS)
    remove_partial_scores(out)
    return results
