"""Scoring after the ranker: temperature calibration of the retriever, the letter prior, fusion."""

import math

import pytest
import torch

from llamarec.candidates import load_candidates
from llamarec.ranking.evaluate import letter_prior
from llamarec.ranking.examples import RankExample, evaluation_examples
from llamarec.ranking.llm import load_llm
from llamarec.ranking.ranker import Ranker, shuffled_order
from llamarec.ranking.scoring import FUSION_WEIGHTS, estimate_letter_prior, fit_temperature, fuse


def test_fit_temperature_recovers_the_temperature_that_generated_the_labels():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(20_000, 20, generator=generator) * 3
    for true_t in (0.5, 2.0):
        labels = torch.multinomial((logits / true_t).softmax(-1), 1, generator=generator).squeeze(1)
        assert fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.05)


def test_fit_temperature_of_a_sharper_population_is_smaller():
    """A retriever right more often (its training prefixes) gets a lower temperature."""
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(5_000, 20, generator=generator)
    top = logits.argmax(-1)
    random = torch.randint(0, 20, (5_000,), generator=generator)
    often_right = torch.where(torch.rand(5_000, generator=generator) < 0.8, top, random)
    rarely_right = torch.where(torch.rand(5_000, generator=generator) < 0.2, top, random)
    assert fit_temperature(logits, often_right) < fit_temperature(logits, rarely_right)


def test_the_fusion_grid_has_large_finite_weights_and_the_retriever_alone():
    finite = [w for w in FUSION_WEIGHTS if not math.isinf(w)]
    assert FUSION_WEIGHTS[-1] == float("inf") and max(finite) >= 100 and len(finite) >= 15
    assert list(FUSION_WEIGHTS) == sorted(FUSION_WEIGHTS)


def test_fuse_with_a_temperature_scales_the_retriever():
    llm, ret = torch.tensor([[0.0, 1.0, 3.0]]), torch.tensor([[3.0, 2.0, 0.0]])
    torch.testing.assert_close(fuse(llm, ret, 2.0, temperature=4.0),
                               llm.log_softmax(-1) + 2.0 * (ret / 4.0).log_softmax(-1))


def test_estimate_letter_prior_recovers_a_planted_prior_from_shuffled_prompts():
    generator = torch.Generator().manual_seed(2)
    n, users = 20, 4000
    content = torch.randn(users, n, generator=generator)
    planted = torch.linspace(3.0, 0.0, n)  # strongly favours the first letters
    orders = torch.stack([torch.randperm(n, generator=generator) for _ in range(users)])
    shown = content.gather(1, orders) + planted  # logit of the letter at position j
    prior = torch.tensor(estimate_letter_prior(shown))
    assert abs(prior.sum().item()) < 1e-4
    torch.testing.assert_close(prior, planted - planted.mean(), atol=0.15, rtol=0)


@pytest.fixture
def ranker(tiny_llm_dir, tiny_dataset) -> Ranker:
    model, tokenizer = load_llm(str(tiny_llm_dir), dtype="float32", device="cpu")
    return Ranker(model, tokenizer, tiny_dataset.titles, batch_size=8)


def test_calibration_removes_a_planted_letter_prior(ranker, tiny_retriever_run, tiny_dataset, monkeypatch):
    """A model that adds a big bonus to the first letters: the estimated prior finds it, and
    scores calibrated with it equal the unbiased model's scores up to one constant per row."""
    examples = evaluation_examples(tiny_dataset, load_candidates(tiny_retriever_run, "val"), "val")
    clean = ranker.score(examples)
    clean_prior = torch.tensor(letter_prior(ranker, examples, seed=0))

    planted = torch.linspace(60.0, 0.0, 20)
    original = ranker.scorer.score_ids
    monkeypatch.setattr(ranker.scorer, "score_ids", lambda prompts: original(prompts) + planted)
    biased = ranker.score(examples)
    assert (biased.argmax(-1) == 0).all()  # the bonus dominates every prompt
    prior = torch.tensor(letter_prior(ranker, examples, seed=0))
    torch.testing.assert_close(prior - clean_prior, planted - planted.mean(), atol=1e-4, rtol=0)
    calibrated = ranker.score(examples, letter_prior=prior.tolist())
    clean_calibrated = clean - clean_prior  # the clean model calibrated by its own prior
    torch.testing.assert_close(calibrated.log_softmax(-1), clean_calibrated.log_softmax(-1), atol=1e-4, rtol=0)


def test_shuffled_order_depends_only_on_the_candidates_and_the_seed(ranker, tiny_retriever_run, tiny_dataset):
    examples = evaluation_examples(tiny_dataset, load_candidates(tiny_retriever_run, "test"), "test")[:3]
    assert (shuffled_order(examples[0].candidates, 1) == shuffled_order(examples[0].candidates, 1)).all()
    assert (shuffled_order(examples[0].candidates, 1) != shuffled_order(examples[0].candidates, 2)).any()
    shuffled = ranker.score(examples, "shuffled", seed=1)
    # the same candidate keeps its score however the batch is composed
    torch.testing.assert_close(ranker.score(examples[1:2], "shuffled", seed=1), shuffled[1:2], atol=1e-5, rtol=0)
    # each row is the retriever-order score of the permuted candidates, mapped back
    perm = shuffled_order(examples[0].candidates, 1)
    permuted = RankExample(0, examples[0].history, tuple(examples[0].candidates[i] for i in perm), 0)
    direct = ranker.score([permuted])[0]
    torch.testing.assert_close(shuffled[0, torch.from_numpy(perm)], direct, atol=1e-5, rtol=0)
