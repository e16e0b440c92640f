"""A non-LLM control for the ranker: fuse the retriever with the candidates' popularity.

The LLM stage has to add a signal the retriever misses. Popularity is the simplest candidate
signal there is, and on ml-100k the targets drift towards less popular items over time, so
this script asks whether it helps at all: each candidate's score is ``+/- log(1 + number of
ratings in the training data)``, fused with the retriever exactly as ``rank evaluate`` fuses
the LLM's letter logits (weight tuned on the validation users, temperature fitted on all of
them), and the test difference to the retriever comes with its paired bootstrap interval.

    python scripts/popularity_fusion.py runs/cpuq/retriever
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from llamarec.candidates import load_candidates
from llamarec.data import load_run_dataset
from llamarec.metrics import paired_bootstrap, per_user_metric, target_ranks
from llamarec.ranking.scoring import fit_temperature, fuse, tune_fusion


def popularity(retriever_dir: Path) -> np.ndarray:
    """Ratings per item in the training part of every sequence (the last two are held out)."""
    ds = load_run_dataset(retriever_dir)
    counts = np.zeros(ds.n_items + 1)
    for seq in ds.sequences:
        np.add.at(counts, seq[:-2], 1)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("retriever", type=Path, help="a retriever run directory with candidates")
    args = parser.parse_args()
    counts = popularity(args.retriever)
    split = {s: load_candidates(args.retriever, s) for s in ("val", "test")}
    labels = {s: torch.from_numpy((c.items == c.targets[:, None]).argmax(1)) for s, c in split.items()}
    retriever = {s: torch.from_numpy(c.scores).float() for s, c in split.items()}
    valid = {s: torch.from_numpy(c.valid()) for s, c in split.items()}
    temperature = fit_temperature(retriever["val"][valid["val"]], labels["val"][valid["val"]])
    results = {"temperature": temperature}
    for sign, name in ((1.0, "popular first"), (-1.0, "unpopular first")):
        feature = {s: sign * torch.from_numpy(np.log1p(counts[c.items])).float() for s, c in split.items()}
        v = valid["val"]
        weight, _ = tune_fusion(feature["val"][v], retriever["val"][v], labels["val"][v], temperature)
        out = {"fusion_weight": weight}
        for s in ("val", "test"):
            fused = fuse(feature[s], retriever[s], weight, temperature)
            # Users whose target is not a candidate score 0 either way (rank >= 20).
            ndcg = {name_: torch.where(valid[s], per_user_metric(target_ranks(x, labels[s]), "NDCG@10"), 0.0)
                    for name_, x in (("fused", fused), ("retriever", retriever[s]))}
            out[s] = {"retriever_NDCG@10": ndcg["retriever"].mean().item(), "fused_NDCG@10": ndcg["fused"].mean().item(),
                      "fused_vs_retriever": paired_bootstrap(ndcg["fused"], ndcg["retriever"])}
        results[name] = out
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
