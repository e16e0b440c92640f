"""How much averaging metrics per batch instead of per user moves a retriever's numbers.

    python benchmarks/batch_averaging.py --run RUN_DIR [RUN_DIR ...] [--batch 16]

Our metrics are means over users. An evaluation loop that averages each batch and then the
batch means (as the original LlamaRec code does, per the issue that reported it) gives the last,
smaller batch the weight of a full one: with 610 users in batches of 16 the last batch holds 2
users, who then count 8x. This prints, for each run's best model on the test set, both views of
NDCG/Recall@5/10, with users in our order (sorted raw user id).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from llamarec.data.split import eval_examples
from llamarec.metrics import metrics_from_ranks
from llamarec.retrieval.evaluate import evaluate_ranks
from llamarec.retrieval.train import load_retriever

NAMES = ("NDCG@5", "Recall@5", "NDCG@10", "Recall@10")


def per_batch_mean(ranks: torch.Tensor, batch: int) -> dict[str, float]:
    """The mean over batches of each batch's mean over its users."""
    batches = [metrics_from_ranks(chunk) for chunk in ranks.split(batch)]
    return {name: sum(b[name] for b in batches) / len(batches) for name in NAMES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, nargs="+", required=True, help="retriever run directories")
    parser.add_argument("--batch", type=int, default=16, help="evaluation batch size to mimic (16)")
    args = parser.parse_args()
    table = Table("run", "users", "averaged", *NAMES, title=f"Test metrics: per user vs per batch of {args.batch}")
    for run in args.run:
        model, cfg, ds = load_retriever(run)
        histories, targets = eval_examples(ds, "test")
        ranks = torch.from_numpy(evaluate_ranks(model, histories, targets, cfg.max_len))
        per_user = metrics_from_ranks(ranks)
        for label, values in (("per user", per_user), ("per batch", per_batch_mean(ranks, args.batch))):
            table.add_row(run.name, str(len(ranks)), label, *(f"{values[n]:.4f}" for n in NAMES))
    Console().print(table)


if __name__ == "__main__":
    main()
