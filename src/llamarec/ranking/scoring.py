"""How a ranker's letter logits become the final ranking: candidate order, permutation
averaging, letter-prior calibration and fusion with the retriever.

:class:`ScoringConfig` is saved with the fusion weight it was tuned with (evaluation writes it,
serving reads it), so a run is always served the way it was evaluated.

Fusion adds ``weight`` x the retriever's log-probabilities over the candidates (its scores
divided by ``retriever_temperature``, then log-softmax) to the ranker's (its logits times
``ranker_scale``). A residually trained ranker (``residual_weight`` in its config) learned
exactly this sum with its own ``weight`` and its learned gate as ``ranker_scale``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from llamarec.metrics import metrics_from_ranks, target_ranks

KS = (1, 5, 10)
FUSION_WEIGHTS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0,
                  64.0, 128.0, 256.0, float("inf"))
"""Fusion weights tried on validation users; ``inf`` is the retriever's order (the ranker only
breaks ties), so the grid always holds the retriever alone."""

Order = Literal["retriever", "shuffled", "average"]


class ScoringConfig(BaseModel):
    """Everything between the ranker's letter logits and the final scores."""

    model_config = ConfigDict(extra="forbid")

    order: Order = Field("retriever", description="candidate order in the prompt: the retriever's, "
                         "a random one per history, or the average over several orders")
    permutations: int = Field(1, ge=1, description="orders averaged when order is 'average'")
    seed: int = 0
    letter_prior: list[float] | None = Field(
        None, description="per-position letter log-prior subtracted from the logits (calibration)")
    ranker_scale: float = Field(1.0, description="factor on the ranker's logits (a residual ranker's gate)")
    fusion_weight: float = Field(float("inf"), ge=0.0)
    retriever_temperature: float = Field(1.0, gt=0.0)


def fuse(llm: torch.Tensor, retriever: torch.Tensor, weight: float, temperature: float = 1.0) -> torch.Tensor:
    """Ranker log-probabilities plus ``weight`` x retriever log-probabilities over the candidates.
    ``inf`` means the retriever's order, with the ranker only breaking ties."""
    llm_lp, ret_lp = llm.log_softmax(-1), (retriever / temperature).log_softmax(-1)
    if math.isinf(weight):
        return ret_lp + 1e-6 * llm_lp
    return llm_lp + weight * ret_lp


def tune_fusion(llm: torch.Tensor, retriever: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                metric: str = "NDCG@10") -> tuple[float, dict[float, float]]:
    """The weight of :data:`FUSION_WEIGHTS` with the best ``metric``; ties go to the larger
    weight (closer to the retriever)."""
    results = {w: metrics_from_ranks(target_ranks(fuse(llm, retriever, w, temperature), labels), KS)[metric]
               for w in FUSION_WEIGHTS}
    best = max(results.values())
    return max(w for w, v in results.items() if v >= best - 1e-12), results


def fit_temperature(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature ``T`` that maximises the likelihood of the targets under
    ``softmax(scores / T)``: calibrates retriever scores on one population of users.

    A retriever is over-confident on the training prefixes it was fitted on, so training
    prefixes and held-out users each get their own ``T``.
    """
    scores, labels = scores.double(), labels.long()

    def nll(t: float) -> float:
        return -(scores / t).log_softmax(-1).gather(1, labels.view(-1, 1)).mean().item()

    grid = torch.logspace(-3, 3, 121, dtype=torch.float64).tolist()
    best = min(range(len(grid)), key=lambda i: nll(grid[i]))
    lo, hi = math.log(grid[max(best - 1, 0)]), math.log(grid[min(best + 1, len(grid) - 1)])
    for _ in range(40):  # golden-section search on log T around the best grid point
        a, b = hi - (hi - lo) / 1.618034, lo + (hi - lo) / 1.618034
        if nll(math.exp(a)) < nll(math.exp(b)):
            hi = b
        else:
            lo = a
    return math.exp((lo + hi) / 2)


def estimate_letter_prior(shown_logits: torch.Tensor) -> list[float]:
    """The ranker's preference for each letter position regardless of content.

    ``shown_logits[b, j]`` is the logit of the letter at position ``j`` of a prompt whose
    candidates were put in a random order: averaged over many such prompts, content averages
    out and what remains is the position's prior (log-softmax, centred to mean 0).
    """
    prior = shown_logits.float().log_softmax(-1).mean(0)
    return (prior - prior.mean()).tolist()
