"""Non-LLM controls for the ranker: fuse the retriever with a simple candidate signal.

The LLM stage has to add a signal the retriever misses. This script asks how much two simple
order-free signals add, fused with the retriever exactly as ``rank evaluate`` fuses the LLM's
letter logits (weight tuned on the validation users whose target is a candidate, retriever
temperature fitted on them), with the paired bootstrap interval of the difference to the
retriever's overall NDCG@10 on each split:

- ``popularity``: ``+/- log(1 + ratings in the training data)`` of each candidate;
- ``knn``: item-to-item cosine similarity (co-occurrence in the training sequences) of each
  candidate with the user's last 1 / 20 items.

    python scripts/control_fusion.py runs/cpuq/retriever
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from llamarec.candidates import Candidates, load_candidates
from llamarec.data import Dataset, load_run_dataset
from llamarec.errors import LlamarecError
from llamarec.metrics import paired_bootstrap, per_user_metric, target_ranks
from llamarec.ranking.scoring import fit_temperature, fuse, tune_fusion

SPLITS = ("val", "test")


def training_matrix(ds: Dataset) -> np.ndarray:
    """Users x items, 1 where the user rated the item in the training part of the sequence."""
    x = np.zeros((ds.n_users, ds.n_items + 1), dtype=np.float32)
    for u, seq in enumerate(ds.sequences):
        x[u, seq[:-2]] = 1.0
    return x


def knn_scores(ds: Dataset, sim: np.ndarray, cands: Candidates, split: str, last: int) -> np.ndarray:
    """Sum of the candidates' similarities to the user's ``last`` history items."""
    out = np.zeros(cands.items.shape, dtype=np.float32)
    for u, seq in enumerate(ds.sequences):
        history = seq[:-2] if split == "val" else seq[:-1]
        out[u] = sim[np.ix_(history[-last:], cands.items[u])].sum(0)
    return out


def compare(features: dict[str, torch.Tensor], retriever: dict, labels: dict, valid: dict,
            temperature: float) -> dict:
    v = valid["val"]
    weight, _ = tune_fusion(features["val"][v], retriever["val"][v], labels["val"][v], temperature)
    out: dict = {"fusion_weight": weight}
    for s in SPLITS:
        fused = fuse(features[s], retriever[s], weight, temperature)
        # A user whose target is not a candidate scores 0 either way (rank >= 20).
        ndcg = {name: torch.where(valid[s], per_user_metric(target_ranks(x, labels[s]), "NDCG@10"), 0.0)
                for name, x in (("fused", fused), ("retriever", retriever[s]))}
        out[s] = {"retriever_NDCG@10": ndcg["retriever"].mean().item(), "fused_NDCG@10": ndcg["fused"].mean().item(),
                  "fused_vs_retriever": paired_bootstrap(ndcg["fused"], ndcg["retriever"])}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("retriever", type=Path, help="a retriever run directory with candidates")
    args = parser.parse_args()
    ds = load_run_dataset(args.retriever)
    cands = {s: load_candidates(args.retriever, s) for s in SPLITS}
    labels = {s: torch.from_numpy((c.items == c.targets[:, None]).argmax(1)) for s, c in cands.items()}
    retriever = {s: torch.from_numpy(c.scores).float() for s, c in cands.items()}
    valid = {s: torch.from_numpy(c.valid()) for s, c in cands.items()}
    temperature = fit_temperature(retriever["val"][valid["val"]], labels["val"][valid["val"]])
    x = training_matrix(ds)
    counts = x.sum(0)
    co = x.T @ x
    norm = np.sqrt(np.diag(co)) + 1e-9
    sim = co / norm[:, None] / norm[None, :]
    np.fill_diagonal(sim, 0.0)
    signals = {
        "popular first": {s: torch.from_numpy(np.log1p(counts[c.items])) for s, c in cands.items()},
        "unpopular first": {s: -torch.from_numpy(np.log1p(counts[c.items])) for s, c in cands.items()},
        **{f"knn last {n}": {s: 10 * torch.from_numpy(knn_scores(ds, sim, c, s, n)) for s, c in cands.items()}
           for n in (1, 20)},
    }
    results = {"temperature": temperature,
               **{name: compare(f, retriever, labels, valid, temperature) for name, f in signals.items()}}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    try:
        main()
    except LlamarecError as exc:  # e.g. not a retriever run, or one without candidates
        raise SystemExit(f"error: {exc}") from None
