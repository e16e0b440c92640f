"""Ranking metrics on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from llamarec.metrics import (
    DEFAULT_KS,
    exclude_items,
    metrics_from_ranks,
    overall_metrics,
    rank_metrics,
    target_ranks,
)

INF = float("-inf")


def test_rank_zero_is_perfect() -> None:
    m = rank_metrics(torch.tensor([[0.1, 0.9, 0.5, 0.3]]), torch.tensor([1]), ks=(1, 5))
    assert m == {"Recall@1": 1.0, "NDCG@1": 1.0, "MRR@1": 1.0,
                 "Recall@5": 1.0, "NDCG@5": 1.0, "MRR@5": 1.0}


def test_rank_two() -> None:
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1]])
    assert target_ranks(scores, torch.tensor([2])).tolist() == [2]
    m = rank_metrics(scores, torch.tensor([2]), ks=(1, 2, 3, 5))
    assert m["Recall@1"] == 0.0 and m["NDCG@1"] == 0.0 and m["MRR@1"] == 0.0
    assert m["Recall@2"] == 0.0 and m["NDCG@2"] == 0.0  # rank 2 is the third place
    assert m["Recall@3"] == 1.0
    assert m["NDCG@3"] == pytest.approx(0.5)  # 1 / log2(2 + 2)
    assert m["NDCG@5"] == pytest.approx(0.5)
    assert m["MRR@5"] == pytest.approx(1 / 3)


def test_default_ks() -> None:
    m = rank_metrics(torch.tensor([[3.0, 2.0, 1.0]]), torch.tensor([1]))
    assert DEFAULT_KS == (1, 5, 10, 20)
    assert list(m) == [f"{n}@{k}" for k in DEFAULT_KS for n in ("Recall", "NDCG", "MRR")]
    assert m["Recall@1"] == 0.0 and m["MRR@10"] == 0.5
    assert m["NDCG@20"] == pytest.approx(1 / math.log2(3))


def test_ties_count_against_the_target() -> None:
    # target tied with two others at the top: all of them count as above it
    assert target_ranks(torch.tensor([[1.0, 1.0, 1.0, 0.0]]), torch.tensor([1])).tolist() == [2]
    # one item above and one tie
    assert target_ranks(torch.tensor([[2.0, 1.0, 1.0, 0.0]]), torch.tensor([2])).tolist() == [2]
    # ties below the target do not matter
    assert target_ranks(torch.tensor([[2.0, 0.0, 0.0, 5.0]]), torch.tensor([3])).tolist() == [0]
    # a constant scorer puts the target last and earns nothing at k=1
    const = torch.zeros(2, 5)
    assert target_ranks(const, torch.tensor([0, 4])).tolist() == [4, 4]
    assert rank_metrics(const, torch.tensor([0, 4]), ks=(1, 4))["Recall@4"] == 0.0


def test_k_larger_than_number_of_items() -> None:
    m = rank_metrics(torch.tensor([[0.0, 1.0, 2.0, 3.0]]), torch.tensor([0]), ks=(20,))
    # the target is last (rank 3) but still inside the top 20
    assert m["Recall@20"] == 1.0
    assert m["NDCG@20"] == pytest.approx(1 / math.log2(5))
    assert m["MRR@20"] == pytest.approx(0.25)


def test_mean_over_rows() -> None:
    m = metrics_from_ranks(torch.tensor([0, 2, 10]), ks=(1, 5))
    assert m["Recall@1"] == pytest.approx(1 / 3)
    assert m["Recall@5"] == pytest.approx(2 / 3)
    assert m["NDCG@5"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert m["MRR@5"] == pytest.approx((1 + 1 / 3) / 3)
    assert metrics_from_ranks([0, 2, 10], ks=(1, 5)) == m  # plain lists work too


def test_batch_rank_metrics_match_ranks() -> None:
    scores = torch.tensor([[0.0, 0.3, 0.2, 0.1], [0.0, 0.1, 0.2, 0.3], [0.0, 0.5, 0.5, 0.4]])
    labels = torch.tensor([1, 1, 3], dtype=torch.int32)
    assert target_ranks(scores, labels).tolist() == [0, 2, 2]
    assert rank_metrics(scores, labels, ks=(1, 3)) == pytest.approx(
        {"Recall@1": 1 / 3, "NDCG@1": 1 / 3, "MRR@1": 1 / 3,
         "Recall@3": 1.0, "NDCG@3": (1 + 0.5 + 0.5) / 3, "MRR@3": (1 + 1 / 3 + 1 / 3) / 3})


def test_no_rows_gives_zeros() -> None:
    assert metrics_from_ranks(torch.tensor([]), ks=(1, 5)) == {
        "Recall@1": 0.0, "NDCG@1": 0.0, "MRR@1": 0.0, "Recall@5": 0.0, "NDCG@5": 0.0, "MRR@5": 0.0}


def test_nan_target_ranks_last() -> None:
    nan = float("nan")
    scores = torch.tensor([[nan, 1.0, 2.0, 3.0], [0.0, nan, 1.0, 0.5]])
    # a NaN target is last, never rank -1; a NaN elsewhere counts as the lowest score
    assert target_ranks(scores, torch.tensor([0, 2])).tolist() == [3, 0]
    m = rank_metrics(scores[:1], torch.tensor([0]), ks=(1, 3))
    assert m == {"Recall@1": 0.0, "NDCG@1": 0.0, "MRR@1": 0.0, "Recall@3": 0.0, "NDCG@3": 0.0, "MRR@3": 0.0}


def test_exclude_items_masks_history_and_padding() -> None:
    scores = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    original = scores.clone()
    history = torch.tensor([[1, 3, 0], [2, 0, 0]])
    out = exclude_items(scores, history)
    assert out.tolist() == [[INF, INF, 2.0, INF, 4.0], [INF, 4.0, INF, 2.0, 1.0]]
    assert torch.equal(scores, original)  # the input is not modified


def test_exclude_items_masks_padding_column_without_padding_in_history() -> None:
    scores = torch.tensor([[9.0, 1.0, 2.0, 3.0]])
    out = exclude_items(scores, torch.tensor([[2, 3]]))  # a full history: no 0 in it
    assert out.tolist() == [[INF, 1.0, INF, INF]]
    assert target_ranks(out, torch.tensor([1])).tolist() == [0]


def test_exclude_items_keeps_the_target() -> None:
    scores = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    history = torch.tensor([[1, 3, 0], [2, 0, 0]])
    keep = torch.tensor([3, 4])  # row 0 re-consumes item 3; row 1's target is not in its history
    out = exclude_items(scores, history, keep=keep)
    assert out.tolist() == [[INF, INF, 2.0, 3.0, 4.0], [INF, 4.0, INF, 2.0, 1.0]]
    assert target_ranks(out, keep).tolist() == [1, 2]
    # without keep, the re-consumed target would be masked and rank last
    assert target_ranks(exclude_items(scores, history), keep).tolist()[0] == 4


def test_overall_metrics_weighting() -> None:
    subset = {"Recall@5": 0.6, "NDCG@5": 0.4}
    rest = {"Recall@5": 0.1, "NDCG@5": 0.05}
    out = overall_metrics(subset, 30, rest, 70)
    assert out == pytest.approx({"Recall@5": (0.6 * 30 + 0.1 * 70) / 100, "NDCG@5": 0.155})
    assert out["Recall@5"] == pytest.approx(0.25)
    # a metric the retriever did not report counts as 0 for the other users
    assert overall_metrics({"MRR@5": 0.5}, 2, {}, 2) == {"MRR@5": 0.25}
    assert overall_metrics(subset, 10, rest, 0) == pytest.approx(subset)
    assert overall_metrics(subset, 0, rest, 0) == {"Recall@5": 0.0, "NDCG@5": 0.0}


def test_per_user_metric_averages_to_metrics_from_ranks():
    from llamarec.metrics import per_user_metric

    ranks = torch.tensor([0, 3, 9, 10, 25, 1])
    expected = metrics_from_ranks(ranks, (5, 10))
    for name in ("NDCG@10", "Recall@5", "MRR@10", "NDCG@5"):
        assert per_user_metric(ranks, name).mean().item() == pytest.approx(expected[name])


def test_paired_bootstrap_interval_is_seeded_and_covers_the_difference():
    from llamarec.metrics import paired_bootstrap

    generator = torch.Generator().manual_seed(0)
    b = torch.rand(400, generator=generator)
    a = b + 0.05 + 0.1 * torch.randn(400, generator=generator)
    result = paired_bootstrap(a, b, seed=3)
    assert result["diff"] == pytest.approx((a - b).mean().item())
    assert result["ci_low"] < result["diff"] < result["ci_high"]
    assert 0 < result["ci_low"]  # a real gain of 0.05 with noise 0.1 on 400 users is detected
    half_width = (result["ci_high"] - result["ci_low"]) / 2
    assert half_width == pytest.approx(1.96 * 0.1 / 20, rel=0.2)  # normal-theory width
    assert paired_bootstrap(a, b, seed=3) == result
    null = paired_bootstrap(b + 0.1 * torch.randn(400, generator=generator), b, seed=3)
    assert null["ci_low"] < 0 < null["ci_high"]
    assert paired_bootstrap(torch.ones(5), torch.ones(5)) == {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0}
