"""Full-ranking metrics (Recall, NDCG, MRR @k) and the paper's valid-subset / overall views.

Ranks are 0-based and ties are broken pessimistically: every other item with the same score
as the target counts as ranked above it, so a constant scorer earns nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

DEFAULT_KS = (1, 5, 10, 20)


def target_ranks(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """0-based rank of ``labels[b]`` in ``scores[b]`` (``[B, N]``), ties counted against it.

    A NaN score counts as -inf, so a NaN target ranks last instead of getting rank -1."""
    scores = torch.where(scores.isnan(), float("-inf"), scores)
    target = scores.gather(1, labels.view(-1, 1).long())
    above = (scores > target).sum(1)
    ties = (scores == target).sum(1) - 1
    return above + ties


def metrics_from_ranks(ranks: torch.Tensor, ks: Iterable[int] = DEFAULT_KS) -> dict[str, float]:
    """Mean ``Recall@k``, ``NDCG@k`` and ``MRR@k`` over rows, from 0-based ranks."""
    ranks = torch.as_tensor(ranks, dtype=torch.float64)
    out: dict[str, float] = {}
    if ranks.numel() == 0:
        return {f"{m}@{k}": 0.0 for k in ks for m in ("Recall", "NDCG", "MRR")}
    for k in ks:
        hit = ranks < k
        out[f"Recall@{k}"] = hit.double().mean().item()
        out[f"NDCG@{k}"] = torch.where(hit, 1.0 / torch.log2(ranks + 2), 0.0).mean().item()
        out[f"MRR@{k}"] = torch.where(hit, 1.0 / (ranks + 1), 0.0).mean().item()
    return out


def rank_metrics(scores: torch.Tensor, labels: torch.Tensor,
                 ks: Iterable[int] = DEFAULT_KS) -> dict[str, float]:
    """Metrics for a batch of score rows over all items and one ground-truth item per row."""
    return metrics_from_ranks(target_ranks(scores, labels), ks)


def exclude_items(scores: torch.Tensor, items: torch.Tensor,
                  keep: torch.Tensor | None = None) -> torch.Tensor:
    """Return ``scores`` with ``items`` (``[B, L]``, 0-padded) and the padding column 0 at -inf.

    Used to take each user's history out of the ranking. ``keep`` (``[B]``) names one item
    per row that stays scorable even if it is in ``items`` (a re-consumed target).
    """
    rows = torch.arange(scores.shape[0], device=scores.device)
    kept = scores[rows, keep.long()] if keep is not None else None
    scores = scores.clone()
    scores.scatter_(1, items.long(), float("-inf"))
    if keep is not None:
        scores[rows, keep.long()] = kept
    scores[:, 0] = float("-inf")
    return scores


def overall_metrics(subset: Mapping[str, float], n_subset: int, rest: Mapping[str, float],
                    n_rest: int) -> dict[str, float]:
    """The paper's overall view: the ranker's metrics on the valid subset (users whose target
    the retriever put among the candidates) and the retriever's on the other users, weighted
    by the two groups' sizes."""
    total = n_subset + n_rest
    if total == 0:
        return {k: 0.0 for k in subset}
    return {k: (subset[k] * n_subset + rest.get(k, 0.0) * n_rest) / total for k in subset}


def per_user_metric(ranks: torch.Tensor, metric: str) -> torch.Tensor:
    """One user's value of ``metric`` (``"NDCG@10"``, ``"Recall@5"``, ``"MRR@10"``...) per rank."""
    name, k = metric.split("@")
    ranks = torch.as_tensor(ranks, dtype=torch.float64)
    hit = ranks < int(k)
    value = {"Recall": torch.ones_like(ranks), "NDCG": 1.0 / torch.log2(ranks + 2), "MRR": 1.0 / (ranks + 1)}[name]
    return torch.where(hit, value, 0.0)


def paired_bootstrap(a: torch.Tensor, b: torch.Tensor, n_resamples: int = 2000, seed: int = 0,
                     level: float = 0.95) -> dict[str, float]:
    """Mean of ``a - b`` over users and its percentile bootstrap confidence interval.

    ``a[i]`` and ``b[i]`` are two methods' values for the same user; users are resampled with
    replacement (seeded, so the interval is reproducible)."""
    diff = (torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)).flatten()
    if diff.numel() == 0:
        return {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, diff.numel(), (n_resamples, diff.numel()), generator=generator)
    means = diff[idx].mean(1)
    tail = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return {"diff": diff.mean().item(), "ci_low": low, "ci_high": high}
