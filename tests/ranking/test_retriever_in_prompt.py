"""Prompts that show the retriever's rank and probability: every scoring path passes the
scores aligned with the candidates as shown, and a fine-tuned run trains and serves that way."""

import numpy as np
import pytest
import torch

from llamarec.candidates import load_candidates
from llamarec.ranking.examples import RankExample, evaluation_examples
from llamarec.ranking.finetune import Finetuner
from llamarec.ranking.llm import load_llm
from llamarec.ranking.prompt import PromptConfig
from llamarec.ranking.ranker import Ranker, load_ranker, shuffled_order
from llamarec.ranking.scoring import ScoringConfig

SHOWN = PromptConfig(candidate_item="({letter}) {title} [#{retriever_rank} {retriever_prob}%]")


@pytest.fixture
def ranker(tiny_llm_dir, tiny_dataset) -> Ranker:
    model, tokenizer = load_llm(str(tiny_llm_dir), dtype="float32", device="cpu")
    return Ranker(model, tokenizer, tiny_dataset.titles, SHOWN, batch_size=4)


@pytest.fixture
def examples(tiny_dataset, tiny_retriever_run) -> list[RankExample]:
    return evaluation_examples(tiny_dataset, load_candidates(tiny_retriever_run, "val"), "val")[:6]


def test_the_prompt_shows_each_candidates_own_retriever_figures(ranker, examples):
    ex = examples[0]
    prompt = ranker.prompt(ex.history, ex.candidates, ex.retriever_scores)
    best = int(np.argmax(ex.retriever_scores))
    assert "[#1 " in prompt and ranker.builder.title(ranker.titles[ex.candidates[best]]) + " [#1 " in prompt
    with pytest.raises(Exception, match="needs 20 retriever scores"):
        ranker.prompt(ex.history, ex.candidates)


def test_shuffled_order_shows_the_scores_with_their_candidates(ranker, examples):
    shuffled = ranker.score(examples, "shuffled", seed=3)
    for row, ex in enumerate(examples):
        p = shuffled_order(ex.candidates, 3)
        shown = RankExample(ex.user, ex.history, tuple(ex.candidates[i] for i in p), 0,
                            tuple(ex.retriever_scores[i] for i in p))
        expected = torch.empty(len(p))
        expected[torch.from_numpy(p)] = ranker.score([shown])[0]
        torch.testing.assert_close(shuffled[row], expected, atol=1e-5, rtol=1e-5)


def test_rerank_and_averaged_orders_pass_the_retriever_scores(ranker, examples):
    candidates = np.array([ex.candidates for ex in examples])
    scores = np.array([ex.retriever_scores for ex in examples])
    llm, _ = ranker.rerank([ex.history for ex in examples], candidates, scores, ScoringConfig())
    torch.testing.assert_close(llm, ranker.score(examples), atol=1e-5, rtol=1e-5)
    flat = np.zeros_like(scores)  # other figures shown: other prompts, other scores
    assert not torch.allclose(ranker.rerank([ex.history for ex in examples], candidates, flat, ScoringConfig())[0],
                              llm, atol=1e-4)
    averaged = ranker.score(examples, "average", permutations=3, seed=1)
    assert averaged.shape == llm.shape and torch.isfinite(averaged).all()


def test_a_run_trained_with_the_figures_serves_them(tiny_rank_config, tmp_path):
    cfg = tiny_rank_config(prompt={"candidate_item": SHOWN.candidate_item}, max_examples=4)
    ft = Finetuner(cfg, tmp_path / "rank", progress=False)
    ft.run()
    ft.state.best = -1.0
    ft._validate()
    loaded = load_ranker(tmp_path / "rank", ft.ds.titles, device="cpu", dtype="float32")
    assert loaded.builder.config.shows_retriever
    torch.testing.assert_close(loaded.score(ft.val), ft.ranker.score(ft.val), atol=1e-5, rtol=1e-5)
