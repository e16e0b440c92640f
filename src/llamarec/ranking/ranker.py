"""The LLM ranker: prompts from item ids, letter logits per candidate, and the reranking that
evaluation, :class:`~llamarec.pipeline.Recommender`, the server and batch scoring all share."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from llamarec.configs import read_json_config
from llamarec.errors import LlamarecError
from llamarec.layout import ADAPTER_DIR, FULL_LAYERS_FILE, PROMPT_FILE, RANK_CONFIG, RANKER_SCALE_FILE
from llamarec.ranking.config import RankConfig, retriever_from_config
from llamarec.ranking.examples import RankExample
from llamarec.ranking.prefix_cache import PrefixCache
from llamarec.ranking.prompt import LETTERS, PromptBuilder, PromptConfig
from llamarec.ranking.scoring import Order, ScoringConfig, fuse
from llamarec.ranking.verbalizer import (
    LetterScorer,
    common_prefix,
    permutation_average,
    resolve_letter_ids,
    seeded_orders,
)

if TYPE_CHECKING:
    from llamarec.ranking.title_similarity import TitleSimilarityRanker


def shuffled_order(candidates: Sequence[int], seed: int) -> np.ndarray:
    """A random order of ``candidates`` that depends only on them and ``seed``, so the same
    request is always shown the same way (in evaluation and in serving)."""
    return np.random.default_rng([seed, *(int(c) for c in candidates)]).permutation(len(candidates))


def _reordered(ex: RankExample, order: Sequence[int]) -> RankExample:
    """``ex`` with its candidates (and their retriever scores) shown in ``order``."""
    scores = tuple(ex.retriever_scores[i] for i in order) if ex.retriever_scores else ()
    return RankExample(ex.user, ex.history, tuple(ex.candidates[i] for i in order), 0, scores)


class Ranker:
    """Turns item ids into titled prompts and scores the candidates of each example.

    ``titles[i]`` is the title of item ``i``. Letter ids are resolved once, after a prompt of
    the configured template (every prompt ends with the same text before the answer). With
    several candidate orders per example, ``reuse_prefix`` runs the prompt's shared prefix
    (instruction and history) once per example and reuses its key/value cache for every order.
    ``prefix_cache`` (serving) also keeps that key/value cache for the next request of the same
    history; off by default, and never while the model trains. ``subtract_base`` (a ``delta``
    residual ranker): the scores are what the LoRA adapter adds to the base model's letter logits.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, titles: Sequence[str],
                 prompt_config: PromptConfig | None = None, batch_size: int = 8, reuse_prefix: bool = True,
                 prefix_cache: PrefixCache | None = None, subtract_base: bool = False) -> None:
        self.model, self.tokenizer, self.titles, self.reuse_prefix = model, tokenizer, titles, reuse_prefix
        self.subtract_base = subtract_base
        self.builder = PromptBuilder(tokenizer, prompt_config)
        scores = [0.0] * len(LETTERS) if self.builder.config.shows_retriever else None
        sample = self.builder.build(["a"], ["b"] * len(LETTERS), scores)
        self.letter_ids = resolve_letter_ids(tokenizer, sample)
        self.scorer = LetterScorer(model, tokenizer, self.letter_ids, batch_size, prefix_cache)

    @property
    def batch_size(self) -> int:
        """Prompts per forward pass."""
        return self.scorer.batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        self.scorer.batch_size = value

    @property
    def prefix_cache(self) -> PrefixCache | None:
        return self.scorer.prefix_cache

    @property
    def dtype_name(self) -> str:
        """The model's dtype, e.g. ``bfloat16``."""
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")

    def prompt(self, history: Sequence[int], candidates: Sequence[int],
               retriever_scores: Sequence[float] | None = None) -> str:
        return self.builder.build([self.titles[i] for i in history], [self.titles[i] for i in candidates],
                                  retriever_scores or None)

    def prompt_ids(self, history: Sequence[int], candidates: Sequence[int],
                   retriever_scores: Sequence[float] | None = None) -> list[int]:
        """Token ids of the prompt; ``retriever_scores`` (aligned with ``candidates``) are shown
        when the prompt config asks for the retriever's rank or probability."""
        return self.builder.build_ids([self.titles[i] for i in history], [self.titles[i] for i in candidates],
                                      retriever_scores or None)

    def shown_scores(self, examples: Sequence[RankExample], orders: Sequence[Sequence[int]],
                     letter_prior: Sequence[float] | None = None) -> torch.Tensor:
        """``[len(orders), len(examples), n]`` letter logits of every example shown in every
        order: entry ``[k, b, j]`` is the letter at position ``j`` when the candidates are
        shown as ``candidates[orders[k][j]]``. ``letter_prior`` is subtracted per position."""
        n = len(examples[0].candidates)
        versions = [[_reordered(ex, order) for ex in examples] for order in orders]
        ids = [[self.prompt_ids(ex.history, ex.candidates, ex.retriever_scores) for ex in version]
               for version in versions]
        cached = self.scorer.prefix_cache is not None
        if len(orders) == 1 and cached:
            lengths = [self.prefix_length(ex.history, ex.candidates, ex.retriever_scores) for ex in versions[0]]
            shown = self.scorer.score_shared_prefix(ids, lengths)[..., :n]
        elif len(orders) > 1 and (self.reuse_prefix or cached):
            shown = self.scorer.score_shared_prefix(ids)[..., :n]
        else:
            shown = self.scorer.score_ids([seq for version in ids for seq in version])[:, :n]
            shown = shown.view(len(orders), len(examples), n)
        if letter_prior is not None:
            shown = shown - torch.tensor(letter_prior[:n], dtype=shown.dtype)
        return shown

    def prefix_length(self, history: Sequence[int], candidates: Sequence[int],
                      retriever_scores: Sequence[float] | None = None) -> int:
        """How many leading tokens of :meth:`prompt_ids` do not depend on the candidates: the
        instruction and the history, plus any first tokens the first two candidates' titles
        share. Found as the common prefix with the prompt whose candidates (and their retriever
        scores) are rotated by one: the same titles, so the same history fits the token budget."""
        rotate = lambda xs: [*xs[1:], *xs[:1]] if xs else xs  # noqa: E731
        return len(common_prefix([self.prompt_ids(history, candidates, retriever_scores),
                                  self.prompt_ids(history, rotate(candidates), rotate(retriever_scores))]))

    def score(self, examples: Sequence[RankExample], order: Order = "retriever", permutations: int = 1,
              seed: int = 0, letter_prior: Sequence[float] | None = None) -> torch.Tensor:
        """``[len(examples), n_candidates]`` letter logits, column ``j`` = ``candidates[j]``.

        ``order``: candidates shown as given (the retriever's order), in a random order per
        example (:func:`shuffled_order`), or ``average``: the given order plus
        ``permutations - 1`` seeded random orders, logits averaged per candidate.
        """
        if not examples:
            return torch.empty(0, len(LETTERS))
        adapted = self._score(examples, order, permutations, seed, letter_prior)
        if not self.subtract_base:
            return adapted
        # The base model must not reuse key/value states the adapted model cached.
        cache, self.scorer.prefix_cache = self.scorer.prefix_cache, None
        try:
            with self.model.disable_adapter():
                return adapted - self._score(examples, order, permutations, seed, letter_prior)
        finally:
            self.scorer.prefix_cache = cache

    def _score(self, examples: Sequence[RankExample], order: Order, permutations: int, seed: int,
               letter_prior: Sequence[float] | None) -> torch.Tensor:
        if order == "average":
            n = len(examples[0].candidates)
            return permutation_average(lambda orders: self.shown_scores(examples, orders, letter_prior),
                                       seeded_orders(n, permutations, seed))
        if order == "retriever":
            return self.shown_scores(examples, [list(range(len(examples[0].candidates)))], letter_prior)[0]
        perms = [shuffled_order(ex.candidates, seed) for ex in examples]
        shown_examples = [_reordered(ex, p) for ex, p in zip(examples, perms)]
        shown = self._score(shown_examples, "retriever", 1, seed, letter_prior)
        out = torch.empty_like(shown)
        for row, p in enumerate(perms):
            out[row, torch.from_numpy(p)] = shown[row]
        return out

    def rerank(self, histories: Sequence[Sequence[int]], candidates: np.ndarray, retriever_scores: np.ndarray,
               scoring: ScoringConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """Ranker scores and final (fused) scores, both ``[len(histories), k]`` aligned with
        ``candidates``: the one reranking path of evaluation and serving.

        ``histories`` hold item ids, oldest first (only the prompt's last ``max_history`` are
        shown); ``candidates`` and ``retriever_scores`` are the retriever's top-k, best first.
        """
        keep = self.builder.config.max_history
        examples = [RankExample(-1, tuple(int(i) for i in list(h)[-keep:]), tuple(int(i) for i in row), 0,
                                tuple(float(x) for x in scores))
                    for h, row, scores in zip(histories, candidates, np.asarray(retriever_scores))]
        llm = self.score(examples, scoring.order, scoring.permutations, scoring.seed, scoring.letter_prior)
        if not torch.isfinite(llm).all():
            raise LlamarecError("the ranker returned NaN or infinite scores: its weights are damaged")
        ret = torch.as_tensor(np.asarray(retriever_scores), dtype=torch.float32)
        return llm, fuse(scoring.ranker_scale * llm, ret, scoring.fusion_weight, scoring.retriever_temperature)


def read_prompt_config(rank_dir: Path, cfg: RankConfig | None = None) -> PromptConfig:
    """The prompt config a ranker run was trained with (its ``prompt.json``; runs older than
    that file: the one its rank config describes)."""
    path = rank_dir / PROMPT_FILE
    if path.is_file():
        return read_json_config(PromptConfig, path)
    return (cfg or read_rank_config(rank_dir)).prompt_config()


def read_ranker_scale(rank_dir: Path) -> float:
    """The factor on the ranker's letter logits before fusion: the gate a residual ranker
    learned (saved with its adapter), 1 for any other ranker."""
    path = rank_dir / ADAPTER_DIR / RANKER_SCALE_FILE
    if not path.is_file():
        return 1.0
    try:
        return float(json.loads(path.read_text(encoding="utf-8"))["ranker_scale"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LlamarecError(f"{path}: not a valid ranker scale ({' '.join(str(exc).split())})") from None


def read_rank_config(rank_dir: Path) -> RankConfig:
    path = rank_dir / RANK_CONFIG
    if not path.is_file():
        raise LlamarecError(f"{rank_dir}: not a ranker run ({RANK_CONFIG} missing)")
    cfg = read_json_config(RankConfig, path)
    return cfg.model_copy(update={"retriever": retriever_from_config(rank_dir, cfg.retriever)})


def load_ranker(rank_dir: Path, titles: Sequence[str], *, zero_shot: bool = False, device: str | None = None,
                dtype: str | None = None, batch_size: int | None = None,
                prefix_cache: PrefixCache | None = None) -> Ranker | TitleSimilarityRanker:
    """The ranker of a ranker run: base LLM (hub id, cache or offline wheel, never copied into
    the run) plus the run's LoRA adapter (or none with ``zero_shot``), with the prompt config it
    was trained with. ``device``/``dtype`` override the run's; ``prefix_cache``: see :class:`Ranker`.
    A ``title_similarity`` run is its title vectors (no LLM, no device, no prompt to cache)."""
    cfg = read_rank_config(rank_dir)
    if cfg.kind == "title_similarity":
        if zero_shot:
            raise LlamarecError(f"{rank_dir}: a title_similarity ranker has no zero-shot form (it is not trained)")
        from llamarec.ranking.title_similarity import load_title_ranker

        return load_title_ranker(rank_dir, titles, read_prompt_config(rank_dir, cfg).max_history,
                                 batch_size or cfg.scoring_batch_size())
    from llamarec.ranking.llm import load_llm

    model, tokenizer = load_llm(cfg.model, dtype=dtype or cfg.dtype, device=device or cfg.device,
                                load_in_4bit=cfg.load_in_4bit, gguf_file=cfg.gguf_file)
    if not zero_shot:
        from peft import PeftModel
        from safetensors import SafetensorError

        adapter = rank_dir / ADAPTER_DIR
        if not adapter.is_dir():
            raise LlamarecError(f"{rank_dir}: no adapter saved yet; train first or pass --zero-shot")
        if cfg.full_layers:
            from llamarec.ranking.llm import load_full_layers

            load_full_layers(model, adapter / FULL_LAYERS_FILE)
        elif not (adapter / "adapter_model.safetensors").is_file():
            raise LlamarecError(f"{adapter}: no adapter_model.safetensors (other weight formats are "
                                "not loaded: they can run code)")
        else:
            try:
                model = PeftModel.from_pretrained(model, adapter).eval()
            except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
                reason = " ".join(str(exc).split())[:200]
                raise LlamarecError(f"{adapter}: cannot load the adapter ({reason})") from None
    return Ranker(model, tokenizer, titles, read_prompt_config(rank_dir, cfg), batch_size or cfg.eval_batch_size,
                  prefix_cache=prefix_cache, subtract_base=cfg.residual_mode == "delta" and not zero_shot)
