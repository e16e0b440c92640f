"""The LLM ranker: rank examples' candidates with the verbalizer, optionally averaging over
several candidate orders to remove position bias."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from llamarec.ranking.examples import RankExample
from llamarec.ranking.prompt import LETTERS, PromptBuilder, PromptConfig
from llamarec.ranking.verbalizer import LetterScorer, permutation_average, resolve_letter_ids, seeded_orders


class Ranker:
    """Turns item ids into titled prompts and scores the candidates of each example.

    ``titles[i]`` is the title of item ``i``. Letter ids are resolved once, after a prompt of
    the configured template (every prompt ends with the same text before the answer).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, titles: Sequence[str],
                 prompt_config: PromptConfig | None = None, batch_size: int = 8) -> None:
        self.model, self.tokenizer, self.titles = model, tokenizer, titles
        self.builder = PromptBuilder(tokenizer, prompt_config)
        sample = self.builder.build(["a"], ["b"] * len(LETTERS))
        self.letter_ids = resolve_letter_ids(tokenizer, sample)
        self.scorer = LetterScorer(model, tokenizer, self.letter_ids, batch_size)

    def prompt(self, history: Sequence[int], candidates: Sequence[int]) -> str:
        return self.builder.build([self.titles[i] for i in history], [self.titles[i] for i in candidates])

    def score(self, examples: Sequence[RankExample], permutations: int = 1, seed: int = 0) -> torch.Tensor:
        """``[len(examples), n_candidates]`` letter logits, column ``j`` = ``candidates[j]``.

        With ``permutations > 1`` each example is also scored with its candidates shown in
        ``permutations - 1`` seeded random orders and the logits are averaged per candidate.
        """
        if not examples:
            return torch.empty(0, len(LETTERS))
        n = len(examples[0].candidates)
        was_training = self.model.training
        self.model.eval()
        try:
            def score_orders(orders: list[list[int]]) -> torch.Tensor:
                prompts = [self.prompt(ex.history, [ex.candidates[i] for i in order])
                           for order in orders for ex in examples]
                return self.scorer.score(prompts)[:, :n].view(len(orders), len(examples), n)

            return permutation_average(score_orders, seeded_orders(n, permutations, seed))
        finally:
            self.model.train(was_training)
