"""Generation baseline (the paper's Figure 3): the LLM writes the ranked candidate titles.

Kept only to compare quality and speed with the verbalizer, which reads all candidates' scores
from one forward pass. Here the model decodes greedily, up to as many tokens as the candidate
titles and their separators take, and the text is parsed back into a ranking of the candidate
indices (see :func:`parse_ranking`). Candidates the text never mentions are ranked after the
mentioned ones, in their original order.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from llamarec.errors import LlamarecError
from llamarec.ranking.examples import RankExample
from llamarec.ranking.prompt import LETTERS, PromptBuilder, PromptConfig, encode
from llamarec.ranking.verbalizer import pad_batch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

GENERATION_INSTRUCTION = (
    "Rank the candidates from most to least likely to be the user's next item. "
    "Answer with the candidate titles, one per line, best first."
)
FUZZY_THRESHOLD = 0.8
"""Least :class:`difflib.SequenceMatcher` ratio (case-insensitive) for a fuzzy title match. It
accepts small copy errors ("Toy Story (1996)" for "Toy Story (1995)": 0.94) but not another
title that shares the year ("She's the One (1996)" vs "Take the Money and Run (1969)": 0.61,
which difflib's default cutoff 0.6 would accept)."""

_LETTER_PREFIX = re.compile(r"^\(\s*([A-Za-z])\s*\)\s*")
_LETTER_MARKER = re.compile(r"(?=\(\s*[A-Za-z]\s*\))")
_LIST_MARKER = re.compile(r"^(?:[-*\u2022]+|\d{1,2}[.)])\s+")


def _normalize(text: str) -> str:
    return " ".join(text.split())


def _segments(text: str) -> list[str]:
    """Lines, also split before every "(C)"-style marker (a list written on one line)."""
    parts = [part for line in text.splitlines() for part in _LETTER_MARKER.split(line)]
    return [_normalize(part) for part in parts if part.strip()]


def _match_title(segment: str, titles: Sequence[str], used: set[int], threshold: float) -> int | None:
    """The unused candidate ``segment`` names: exact, then case-insensitive, then the best fuzzy
    match with a ratio of at least ``threshold``. ``None`` if nothing matches or the match is
    already used (a repeated title)."""
    folded = segment.casefold()
    for same in (lambda t: t == segment, lambda t: t.casefold() == folded):
        hits = [i for i, title in enumerate(titles) if same(title)]
        if hits:
            return next((i for i in hits if i not in used), None)
    ratios = [difflib.SequenceMatcher(None, folded, t.casefold()).ratio() for t in titles]
    best = max(ratios, default=0.0)
    if best < threshold:
        return None
    return next((i for i, r in enumerate(ratios) if r == best and i not in used), None)


def matched_candidates(text: str, titles: Sequence[str], threshold: float = FUZZY_THRESHOLD) -> list[int]:
    """Indices of the candidates ``text`` names, in the order it names them.

    ``text`` is split into lines (and before each "(C)"-style letter). A segment's list marker
    ("1.", "2)", "-", "*") is dropped; it is then matched to a title (see :func:`_match_title`).
    If it starts with a candidate letter but its remaining text matches no title (or nothing
    is left), the letter decides. Each candidate is taken at most once; segments that match
    nothing are ignored.
    """
    titles = [_normalize(t) for t in titles]
    matched: list[int] = []
    used: set[int] = set()
    for segment in _segments(text):
        segment = _LIST_MARKER.sub("", segment)
        letter = None
        if prefix := _LETTER_PREFIX.match(segment):
            position = LETTERS.find(prefix.group(1).upper())
            letter = position if 0 <= position < len(titles) else None
            segment = segment[prefix.end() :]
        index = _match_title(segment, titles, used, threshold) if segment else None
        if index is None and letter is not None and letter not in used:
            index = letter
        if index is not None:
            used.add(index)
            matched.append(index)
    return matched


def parse_ranking(text: str, titles: Sequence[str], threshold: float = FUZZY_THRESHOLD) -> list[int]:
    """A permutation of ``range(len(titles))``: the candidates ``text`` names (see
    :func:`matched_candidates`), then the others in their original order."""
    return _complete(matched_candidates(text, titles, threshold), len(titles))


def _complete(matched: list[int], n: int) -> list[int]:
    named = set(matched)
    return matched + [i for i in range(n) if i not in named]


def ranking_scores(ranking: Sequence[int]) -> torch.Tensor:
    """Scores ``n - position`` per candidate index: distinct, higher is better, as
    :func:`llamarec.metrics.target_ranks` expects."""
    n = len(ranking)
    scores = torch.empty(n, dtype=torch.float32)
    scores[list(ranking)] = torch.arange(n, 0, -1, dtype=torch.float32)
    return scores


def max_new_tokens(tokenizer: PreTrainedTokenizerBase, titles: Sequence[str], separator: str = "\n") -> int:
    """Token budget of an answer that lists every title once: their token counts plus one
    ``separator`` per title (each counted on its own, without special tokens, so in context
    the answer may tokenise slightly differently)."""
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return sum(count(title) for title in titles) + len(titles) * count(separator)


@dataclass(frozen=True)
class GeneratedRanking:
    """One example's generated answer and the ranking parsed from it."""

    ranking: list[int]  # candidate indices, best first
    text: str
    n_tokens: int  # tokens generated, up to and including the first end-of-sequence token
    n_matched: int  # candidates the text named (the others follow in their original order)

    @property
    def scores(self) -> torch.Tensor:
        return ranking_scores(self.ranking)


class GenerationRanker:
    """Ranks examples' candidates by greedy generation of their titles.

    ``titles[i]`` is the title of item ``i``. Without ``prompt_config`` the default prompt is
    used with :data:`GENERATION_INSTRUCTION`; a given config is used as it is.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, titles: Sequence[str],
                 prompt_config: PromptConfig | None = None, batch_size: int = 1) -> None:
        if batch_size < 1:
            raise LlamarecError(f"batch size must be at least 1, got {batch_size}")
        self.model, self.tokenizer, self.titles = model, tokenizer, titles
        config = prompt_config or PromptConfig(instruction=GENERATION_INSTRUCTION)
        self.builder = PromptBuilder(tokenizer, config)
        self.batch_size = batch_size

    def prompt(self, example: RankExample) -> str:
        return self.builder.build([self.titles[i] for i in example.history],
                                  [self.titles[i] for i in example.candidates], example.retriever_scores or None)

    def shown_titles(self, example: RankExample) -> list[str]:
        """The candidate titles as the prompt shows them (sanitised and cut), to match against."""
        return [self.builder.title(self.titles[i]) for i in example.candidates]

    def rank(self, examples: Sequence[RankExample]) -> tuple[torch.Tensor, list[str]]:
        """``[len(examples), n_candidates]`` scores (``n - position``) and the generated texts."""
        results = self.generate(examples)
        n = len(examples[0].candidates) if examples else len(LETTERS)
        scores = torch.stack([r.scores for r in results]) if results else torch.empty(0, n)
        return scores, [r.text for r in results]

    def generate(self, examples: Sequence[RankExample]) -> list[GeneratedRanking]:
        """Generate and parse an answer per example, ``batch_size`` prompts at a time.

        The model runs in eval mode and is put back in its previous mode after.
        """
        if len({len(ex.candidates) for ex in examples}) > 1:
            raise LlamarecError("all examples must have the same number of candidates")
        was_training = self.model.training
        self.model.eval()
        try:
            results: list[GeneratedRanking] = []
            for start in range(0, len(examples), self.batch_size):
                results += self._generate_batch(examples[start : start + self.batch_size])
            return results
        finally:
            self.model.train(was_training)

    @torch.inference_mode()
    def _generate_batch(self, examples: Sequence[RankExample]) -> list[GeneratedRanking]:
        titles = [self.shown_titles(ex) for ex in examples]
        stops = self._eos_ids()
        budgets = [max_new_tokens(self.tokenizer, t) for t in titles]
        pad_id = self.tokenizer.pad_token_id
        pad_id = 0 if pad_id is None else pad_id
        input_ids, attention_mask = pad_batch([encode(self.tokenizer, self.prompt(ex)) for ex in examples],
                                              pad_id)
        device = next(self.model.parameters()).device
        output = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            do_sample=False,
            max_new_tokens=max(budgets),
            pad_token_id=pad_id,
            eos_token_id=sorted(stops) or None,
        )
        results = []
        for row, budget, shown in zip(output[:, input_ids.shape[1] :].tolist(), budgets, titles, strict=True):
            new = row[:budget]  # a batch runs to its longest budget; each row keeps its own
            end = next((i + 1 for i, token in enumerate(new) if token in stops), len(new))
            text = self.tokenizer.decode(new[:end], skip_special_tokens=True)
            matched = matched_candidates(text, shown)
            results.append(GeneratedRanking(_complete(matched, len(shown)), text, end, len(matched)))
        return results

    def _eos_ids(self) -> set[int]:
        ids = getattr(self.model.generation_config, "eos_token_id", None)
        ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return set(ids)
