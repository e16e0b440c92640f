"""Non-LLM controls for the ranker: fuse the retriever with a simple candidate signal.

The LLM stage has to add a signal the retriever misses. This script asks how much two simple
order-free signals add, fused with the retriever exactly as ``rank evaluate`` fuses the LLM's
letter logits (weight tuned on the validation users whose target is a candidate, retriever
temperature fitted on them), with the paired bootstrap interval of the difference to the
retriever's overall NDCG@10 on each split:

- ``popularity``: ``+/- log(1 + ratings in the training data)`` of each candidate;
- ``knn``: item-to-item cosine similarity (co-occurrence in the training sequences) of each
  candidate with the user's last 1 / 20 items;
- with ``--llm [MODEL]``: what the LLM's own picture of the titles holds, with no training:
  each title's mean last-layer hidden state (centred, unit length), and a candidate's score
  its dot product with the mean of the user's last 1 / 5 / 20 titles' (the cosine for the last
  one; MODEL: a hub id or local dir; SmolLM2-135M-Instruct if none);
- with ``--trained`` as well: what training can get out of those title embeddings. A small
  scorer (a trained projection of frozen item vectors, a position-weighted mean over the user's
  last 10 items, a dot product with each candidate's) is trained on every training prefix
  whose target is a candidate, as a residual on the retriever's log-probabilities (temperature
  fitted on the prefixes, as residual ranker training does), keeping the best of its epochs by the
  validation users' residual loss (reported with the test users' residual loss, both next to
  the retriever's own loss on those users). Its control is the same scorer on random item vectors:
  what it gains there comes from a second model trained on the same data, not from the LLM.

Each signal is also scored alone (``alone_NDCG@10``; a random order of the candidates scores
about 0.227 on the users whose target is a candidate, times their share of all users). Ties
count against the target, as in every llamarec metric, so a signal with many equal scores
(co-occurrence with one item is often 0) scores lower alone than with ties broken at random.

    python scripts/control_fusion.py runs/cpuq/retriever [--llm [--trained]]
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch

from llamarec.candidates import Candidates, load_candidates, load_train_candidates
from llamarec.data import Dataset, load_run_dataset
from llamarec.errors import LlamarecError
from llamarec.metrics import paired_bootstrap, per_user_metric, target_ranks
from llamarec.ranking.scoring import fit_temperature, fuse, tune_fusion
from llamarec.ranking.title_vectors import embed_titles

SPLITS = ("val", "test")
HISTORY = 10


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


def title_embeddings(titles: list[str], model_id: str | None, batch: int = 32) -> np.ndarray:
    """Unit-length, mean-centred mean last-layer hidden states of each title (row 0: padding):
    the title_similarity ranker's vectors."""
    from llamarec.ranking.llm import load_llm

    model, tokenizer = load_llm(model_id, dtype="float32", device="cpu")
    return embed_titles(titles, model, tokenizer, batch_size=batch)


def profile_scores(ds: Dataset, emb: np.ndarray, cands: Candidates, split: str, last: int) -> np.ndarray:
    """Dot product of each candidate's embedding with the mean of the user's ``last`` items'."""
    out = np.zeros(cands.items.shape, dtype=np.float32)
    for u, seq in enumerate(ds.sequences):
        history = seq[:-2] if split == "val" else seq[:-1]
        out[u] = emb[cands.items[u]] @ emb[history[-last:]].mean(0)
    return out


def history_matrix(histories: list[np.ndarray], length: int = HISTORY) -> torch.Tensor:
    """Each history's last ``length`` items, left-padded with 0 (the padding item)."""
    out = np.zeros((len(histories), length), dtype=np.int64)
    for row, history in enumerate(histories):
        last = history[-length:]
        out[row, length - len(last):] = last
    return torch.from_numpy(out)


class FeatureScorer(torch.nn.Module):
    """Candidate scores from frozen item vectors: a trained projection of each item, the user a
    position-weighted mean of the projections of their last items, a score a dot product."""

    def __init__(self, vectors: np.ndarray, dim: int = 64, dropout: float = 0.2) -> None:
        super().__init__()
        # Frozen and not part of the state: only the trained weights are kept per epoch.
        self.register_buffer("vectors", torch.from_numpy(vectors).float(), persistent=False)
        self.project = torch.nn.Sequential(torch.nn.Linear(vectors.shape[1], dim), torch.nn.GELU(),
                                           torch.nn.Linear(dim, dim))
        self.position = torch.nn.Parameter(torch.zeros(HISTORY))
        self.user = torch.nn.Linear(dim, dim)
        self.dropout = torch.nn.Dropout(dropout)

    def forward(self, history: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        weights = self.position.masked_fill(history == 0, -1e4).softmax(-1)
        past = self.project(self.dropout(self.vectors[history]))
        user = self.user((weights.unsqueeze(-1) * past).sum(1))
        return (self.project(self.vectors[candidates]) * user.unsqueeze(1)).sum(-1) / user.shape[-1] ** 0.5


def residual_loss(scores: torch.Tensor | float, retriever_log_probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Cross-entropy of the targets under ``softmax(scores + retriever log-probs)``."""
    return torch.nn.functional.cross_entropy(scores + retriever_log_probs, labels).item()


def train_scorer(vectors: np.ndarray, train: dict[str, torch.Tensor], val: dict[str, torch.Tensor],
                 epochs: int = 10, batch: int = 256, seed: int = 0) -> tuple[FeatureScorer, dict]:
    """Train a :class:`FeatureScorer` as a residual on ``log_probs`` (the retriever's, calibrated)
    and keep the epoch with the lowest validation residual loss.

    ``train`` and ``val`` hold ``history`` [N, HISTORY], ``items`` [N, k], ``labels`` [N] and
    ``log_probs`` [N, k]."""
    if epochs < 1:
        raise LlamarecError(f"epochs {epochs}: at least 1")
    torch.manual_seed(seed)
    scorer = FeatureScorer(vectors)
    optimizer = torch.optim.AdamW(scorer.parameters(), lr=1e-3, weight_decay=1e-4)
    retriever_loss = torch.nn.functional.cross_entropy(val["log_probs"], val["labels"]).item()
    best = {"val_loss": float("inf"), "epoch": -1, "state": None}
    for epoch in range(epochs):
        scorer.train()
        for rows in torch.randperm(len(train["labels"])).split(batch):
            logits = scorer(train["history"][rows], train["items"][rows]) + train["log_probs"][rows]
            loss = torch.nn.functional.cross_entropy(logits, train["labels"][rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scorer.eval()
        with torch.no_grad():
            val_loss = residual_loss(scorer(val["history"], val["items"]), val["log_probs"], val["labels"])
        if val_loss < best["val_loss"]:
            best = {"val_loss": val_loss, "epoch": epoch, "state": copy.deepcopy(scorer.state_dict())}
    if best["state"] is None:
        raise LlamarecError("the trained scorer's validation loss was never finite (training diverged)")
    scorer.load_state_dict(best["state"])
    scorer.eval()
    return scorer, {"best_epoch": best["epoch"], "val_residual_loss": best["val_loss"],
                    "val_retriever_loss": retriever_loss}


def training_prefixes(ds: Dataset, run: Path) -> dict[str, torch.Tensor]:
    """The training prefixes whose target the retriever found, with their calibrated log-probs."""
    train = load_train_candidates(run)
    hits = train["items"] == train["targets"][:, None]
    keep = hits.any(1)
    labels = torch.from_numpy(hits[keep].argmax(1))
    scores = torch.from_numpy(train["scores"][keep]).float()
    histories = [ds.sequences[u][:p] for u, p in zip(train["users"][keep], train["positions"][keep])]
    return {"history": history_matrix(histories), "items": torch.from_numpy(train["items"][keep]).long(),
            "labels": labels, "log_probs": (scores / fit_temperature(scores, labels)).log_softmax(-1)}


def split_histories(ds: Dataset, split: str) -> torch.Tensor:
    """Every user's history before the ``val`` or ``test`` target, as :func:`history_matrix`."""
    return history_matrix([seq[:-2] if split == "val" else seq[:-1] for seq in ds.sequences])


def random_unit_vectors(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Random unit rows over a zero padding row: the title embeddings' shape and scale, no content."""
    out = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    out[0] = 0.0
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
                for name, x in (("fused", fused), ("retriever", retriever[s]), ("alone", features[s]))}
        out[s] = {"retriever_NDCG@10": ndcg["retriever"].mean().item(), "fused_NDCG@10": ndcg["fused"].mean().item(),
                  "alone_NDCG@10": ndcg["alone"].mean().item(),
                  "fused_vs_retriever": paired_bootstrap(ndcg["fused"], ndcg["retriever"])}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("retriever", type=Path, help="a retriever run directory with candidates")
    parser.add_argument("--llm", nargs="?", const="", default=None, metavar="MODEL",
                        help="also the LLM's title similarity (default model: SmolLM2-135M-Instruct)")
    parser.add_argument("--trained", action="store_true",
                        help="with --llm: also a scorer trained on the title embeddings, and on random vectors")
    parser.add_argument("--epochs", type=int, default=10, help="--trained: at most this many epochs")
    parser.add_argument("--seed", type=int, default=0,
                        help="--trained: seed of the scorers' initialisation and batches, and of the random vectors")
    args = parser.parse_args()
    if args.trained and args.llm is None:
        raise SystemExit("error: --trained needs --llm (the title embeddings it trains on)")
    if args.epochs < 1:
        raise SystemExit(f"error: --epochs {args.epochs}: at least 1")
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
    if args.llm is not None:
        emb = title_embeddings(ds.titles, args.llm or None)
        signals.update({f"llm titles last {n}": {s: 10 * torch.from_numpy(profile_scores(ds, emb, c, s, n))
                                                 for s, c in cands.items()} for n in (1, 5, 20)})
    results = {"temperature": temperature,
               **{name: compare(f, retriever, labels, valid, temperature) for name, f in signals.items()}}
    if args.trained:
        train = training_prefixes(ds, args.retriever)
        held_out = {s: {"history": split_histories(ds, s), "items": torch.from_numpy(c.items).long(),
                        "labels": labels[s], "log_probs": (retriever[s] / temperature).log_softmax(-1)}
                    for s, c in cands.items()}
        v = valid["val"]
        val = {k: x[v] for k, x in held_out["val"].items()}
        controls = random_unit_vectors(emb.shape, args.seed)
        for name, vectors in (("trained on llm titles", emb), ("trained on random vectors", controls)):
            scorer, fit = train_scorer(np.sqrt(emb.shape[1]) * vectors, train, val, epochs=args.epochs,
                                       seed=args.seed)
            with torch.no_grad():
                scores = {s: scorer(h["history"], h["items"]) for s, h in held_out.items()}
            t = valid["test"]
            test_log_probs, test_labels = held_out["test"]["log_probs"][t], labels["test"][t]
            fit["test_residual_loss"] = residual_loss(scores["test"][t], test_log_probs, test_labels)
            fit["test_retriever_loss"] = residual_loss(0.0, test_log_probs, test_labels)
            results[name] = {**fit, "training_prefixes": len(train["labels"]),
                             **compare(scores, retriever, labels, valid, temperature)}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    try:
        main()
    except LlamarecError as exc:  # e.g. not a retriever run, or one without candidates
        raise SystemExit(f"error: {exc}") from None
