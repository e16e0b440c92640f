"""The verbalizer: next-token logits of the index letters, read after the prompt, are the scores.

One forward pass per prompt and no generation: the LM head is applied to the last position only
and the logits of the letter tokens A..T (in candidate order) are the candidates' ranking scores;
a softmax over them gives probabilities.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from llamarec.errors import LlamarecError
from llamarec.ranking.prefix_cache import LayerKV, PrefixCache
from llamarec.ranking.prompt import LETTERS, answer_token_id, encode

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


def resolve_letter_ids(
    tokenizer: PreTrainedTokenizerBase, prompt_text: str, n: int = len(LETTERS)
) -> list[int]:
    """Token ids of the first ``n`` letters exactly as they follow ``prompt_text``.

    The ids depend on the context (e.g. "A" and " A" are different tokens), so they are
    resolved after a real prompt of the template in use, never hard-coded. Raises
    :class:`LlamarecError` if a letter is not exactly one extra token or two letters share one.
    """
    if not 1 <= n <= len(LETTERS):
        raise LlamarecError(f"number of letters must be 1 to {len(LETTERS)}, got {n}")
    ids = [answer_token_id(tokenizer, prompt_text, letter) for letter in LETTERS[:n]]
    if len(set(ids)) != n:
        tokens = tokenizer.convert_ids_to_tokens(ids)
        raise LlamarecError(f"answer letters do not map to distinct tokens: {tokens!r}")
    return ids


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int, side: str = "left"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token id lists to one length; returns ``(input_ids, attention_mask)``.

    Scoring needs ``side="left"``: every sequence then ends at the last column, which is where
    ``logits[:, -1]`` reads. With right padding the shorter prompts' last column is padding.
    """
    if side not in {"left", "right"}:
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        cols = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        input_ids[row, cols] = torch.as_tensor(seq, dtype=torch.long)
        attention_mask[row, cols] = 1
    return input_ids, attention_mask


def length_buckets(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (sorted by length), to waste little padding.

    Callers write each batch's results back at these indices to restore the original order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def next_token_logits(
    model: torch.nn.Module, sequences: Sequence[Sequence[int]], pad_id: int
) -> torch.Tensor:
    """``[len(sequences), vocab]`` logits of the token that follows each sequence.

    One forward pass over the left-padded batch, with positions counting real tokens only (as
    in generation, so padding never shifts them) and the LM head applied to the last position
    only (``logits_to_keep=1``). Not wrapped in inference mode, so training can use it too.
    """
    input_ids, attention_mask = pad_batch(sequences, pad_id)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    device = next(model.parameters()).device
    output = model(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        position_ids=position_ids.to(device),
        logits_to_keep=1,
    )
    return output.logits[:, -1]


class LetterScorer:
    """Scores prompts by the next-token logits of the candidate letters.

    ``letter_ids`` come from :func:`resolve_letter_ids` on a prompt of the same template;
    ``score`` returns a ``[len(prompts), len(letter_ids)]`` float32 CPU tensor whose column ``j``
    is the score of the candidate with letter ``LETTERS[j]``. ``prefix_cache`` (for serving: the
    model's weights must not change while it is used) keeps the key/value caches of the prefixes
    :meth:`score_shared_prefix` has run; models with sliding-window attention do without it.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        letter_ids: Sequence[int],
        batch_size: int = 8,
        prefix_cache: PrefixCache | None = None,
    ):
        if batch_size < 1:
            raise LlamarecError(f"batch size must be at least 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.letter_ids = list(letter_ids)
        self.batch_size = batch_size
        if prefix_cache is not None and _has_sliding_layers(model):
            logger.warning("the prefix cache is off: this model has sliding-window attention layers")
            prefix_cache = None
        self.prefix_cache = prefix_cache

    def score(self, prompts: Sequence[str]) -> torch.Tensor:
        """Letter logits for each prompt, batched by length with left padding.

        The model runs in eval mode (no dropout) and is put back in its previous mode after.
        """
        return self.score_ids([encode(self.tokenizer, p) for p in prompts])

    def score_ids(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """:meth:`score` for prompts already tokenized (``encode(tokenizer, prompt)``)."""
        with self._eval_mode():
            return self._score_ids(sequences)

    def score_shared_prefix(self, sequences: Sequence[Sequence[Sequence[int]]],
                            prefix_lengths: Sequence[int] | None = None) -> torch.Tensor:
        """``[K, B, n_letters]`` scores of ``sequences[k][b]``: K versions of each of B prompts
        (e.g. candidate orders) that share a prefix (instruction and history) per prompt.

        The shared prefix of each prompt runs through the model once and its key/value cache is
        reused for all K suffixes, instead of K full forward passes; the scores equal
        :meth:`score_ids` of every sequence within floating-point tolerance. The prefix of
        prompt ``b`` is its first ``prefix_lengths[b]`` tokens (each version must start with
        them and go on after them), by default the versions' longest common prefix.

        With a :attr:`prefix_cache`, a prefix it holds is not run again: the suffixes run on a
        copy of its keys and values (never on the stored tensors); a prefix it does not hold is
        run and stored.
        """
        with self._eval_mode():
            return self._score_shared_prefix(sequences, prefix_lengths)

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        """The model in eval mode (no dropout), put back in its previous mode after."""
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    @functools.cached_property
    def _cache_argument(self) -> str:
        """The model's forward argument that takes a key/value cache: ``cache`` in recent
        transformers (``past_key_values`` is deprecated there), ``past_key_values`` before."""
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model  # peft
        return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def _pad_id(self) -> int:
        pad_id = self.tokenizer.pad_token_id
        return 0 if pad_id is None else pad_id

    @torch.inference_mode()
    def _score_ids(self, encoded: Sequence[Sequence[int]]) -> torch.Tensor:
        scores = torch.empty((len(encoded), len(self.letter_ids)), dtype=torch.float32)
        for batch in length_buckets([len(ids) for ids in encoded], self.batch_size):
            logits = next_token_logits(self.model, [encoded[i] for i in batch], self._pad_id())
            scores[batch] = logits[:, self.letter_ids].float().cpu()
        return scores

    @torch.inference_mode()
    def _score_shared_prefix(self, sequences: Sequence[Sequence[Sequence[int]]],
                             prefix_lengths: Sequence[int] | None) -> torch.Tensor:
        n_versions, n_prompts = len(sequences), len(sequences[0])
        scores = torch.empty((n_versions, n_prompts, len(self.letter_ids)), dtype=torch.float32)
        prefixes = shared_prefixes(sequences, prefix_lengths)
        if not all(prefixes):  # nothing shared: score every version on its own
            flat = self._score_ids([seq for version in sequences for seq in version])
            return flat.view(n_versions, n_prompts, -1)
        device = next(self.model.parameters()).device
        for batch in length_buckets([len(sequences[0][b]) for b in range(n_prompts)], self.batch_size):
            batch_prefixes = [prefixes[b] for b in batch]
            prefix_mask = pad_batch(batch_prefixes, self._pad_id())[1]
            cache = self._prefix_kv(batch_prefixes)
            for k in range(n_versions):
                suffixes = [sequences[k][b][len(prefixes[b]):] for b in batch]
                suffix_ids, suffix_mask = pad_batch(suffixes, self._pad_id())
                positions = prefix_mask.sum(-1, keepdim=True) + suffix_mask.cumsum(-1) - 1
                logits = self.model(input_ids=suffix_ids.to(device),
                                    attention_mask=torch.cat([prefix_mask, suffix_mask], -1).to(device),
                                    position_ids=positions.clamp(min=0).to(device), use_cache=True,
                                    logits_to_keep=1, **{self._cache_argument: cache}).logits[:, -1]
                scores[k, batch] = logits[:, self.letter_ids].float().cpu()
                cache.crop(-suffix_ids.shape[1])  # back to the shared prefix for the next version
        return scores

    def _prefix_kv(self, prefixes: Sequence[Sequence[int]]) -> DynamicCache:
        """The key/value cache of the left-padded ``prefixes``: run through the model, or with
        a prefix cache copied from it for the prefixes it holds, the others run and stored."""
        if self.prefix_cache is None:
            return self._run_prefixes(prefixes)
        rows = [self.prefix_cache.get(prefix) for prefix in prefixes]
        missing = [i for i, row in enumerate(rows) if row is None]
        if missing:
            fresh = self._run_prefixes([prefixes[i] for i in missing])
            for j, i in enumerate(missing):
                rows[i] = _cache_row(fresh, j, len(prefixes[i]))
                self.prefix_cache.put(prefixes[i], rows[i])
            if len(missing) == len(rows):  # nothing came from the prefix cache: use the fresh one
                return fresh
        return self._stack_rows(rows)

    def _run_prefixes(self, prefixes: Sequence[Sequence[int]]) -> DynamicCache:
        """One forward pass over the left-padded prefixes; their key/value cache."""
        prefix_ids, prefix_mask = pad_batch(prefixes, self._pad_id())
        device = next(self.model.parameters()).device
        cache = DynamicCache(config=self.model.config)
        self.model(input_ids=prefix_ids.to(device), attention_mask=prefix_mask.to(device),
                   position_ids=((prefix_mask.cumsum(-1) - 1).clamp(min=0)).to(device),
                   use_cache=True, logits_to_keep=1, **{self._cache_argument: cache})
        return cache

    def _stack_rows(self, rows: Sequence[Sequence[LayerKV]]) -> DynamicCache:
        """A new key/value cache of a batch of prefixes, each row left-padded with zeros (which
        the attention mask hides) to the longest; the rows' tensors are copied, never changed."""
        width = max(row[0][0].shape[-2] for row in rows)
        cache = DynamicCache(config=self.model.config)
        for layer, kvs in enumerate(zip(*rows, strict=True)):
            keys, values = (torch.cat([F.pad(kv[i], (0, 0, width - kv[i].shape[-2], 0)) for kv in kvs])
                            for i in (0, 1))
            cache.update(keys, values, layer)
        return cache

    def probabilities(self, prompts: Sequence[str]) -> torch.Tensor:
        """Softmax of :meth:`score` over the letters: a distribution over the candidates."""
        return self.score(prompts).softmax(-1)


def common_prefix(sequences: Sequence[Sequence[int]]) -> list[int]:
    """The longest common prefix of token sequences, one token short of the shortest, so that
    every sequence keeps at least one token after it."""
    shortest = min(len(seq) for seq in sequences)
    length = 0
    while length < shortest - 1 and all(seq[length] == sequences[0][length] for seq in sequences):
        length += 1
    return list(sequences[0][:length])


def shared_prefixes(sequences: Sequence[Sequence[Sequence[int]]],
                    prefix_lengths: Sequence[int] | None = None) -> list[list[int]]:
    """The prefix of each prompt ``b`` that all its versions ``sequences[k][b]`` share: its first
    ``prefix_lengths[b]`` tokens, checked, or by default the versions' :func:`common_prefix`."""
    versions = [[version[b] for version in sequences] for b in range(len(sequences[0]))]
    if prefix_lengths is None:
        return [common_prefix(seqs) for seqs in versions]
    if len(prefix_lengths) != len(versions):
        raise ValueError(f"{len(prefix_lengths)} prefix lengths for {len(versions)} prompts")
    prefixes = []
    for seqs, length in zip(versions, prefix_lengths):
        prefix = list(seqs[0][:length])
        if length < 0 or any(len(seq) <= length or list(seq[:length]) != prefix for seq in seqs):
            raise ValueError(f"prefix length {length}: not a prefix of every version, with a token after it")
        prefixes.append(prefix)
    return prefixes


def _cache_row(cache: DynamicCache, row: int, length: int) -> tuple[LayerKV, ...]:
    """Copies of one row's keys and values, per layer, without its left padding."""
    return tuple((layer.keys[row:row + 1, :, -length:].clone(), layer.values[row:row + 1, :, -length:].clone())
                 for layer in cache.layers)


def _has_sliding_layers(model: torch.nn.Module) -> bool:
    """Whether some layer keeps only a window of keys and values (e.g. Gemma 3's local layers):
    such a cache cannot be cut into rows and padded again."""
    return any(getattr(layer, "is_sliding", False) for layer in DynamicCache(config=model.config).layers)


def seeded_orders(n: int, count: int, seed: int = 0) -> list[list[int]]:
    """``count`` orders of ``n`` candidates: the identity first, then seeded random permutations.

    ``order[j]`` is the original index of the candidate shown at position ``j``.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    generator = torch.Generator().manual_seed(seed)
    orders = [list(range(n))]
    orders += [torch.randperm(n, generator=generator).tolist() for _ in range(count - 1)]
    return orders


def permutation_average(
    score_fn: Callable[[list[list[int]]], torch.Tensor], orders: Sequence[Sequence[int]]
) -> torch.Tensor:
    """Average scores over several candidate orders, in the original candidate order.

    ``score_fn(orders)`` must return a tensor ``[len(orders), ..., n]`` whose entry ``[k, ..., j]``
    scores the candidate shown at position ``j`` under ``orders[k]`` (any middle dimensions,
    such as a batch of users sharing the orders, are kept). Each row is mapped back so that
    column ``i`` is original candidate ``i``, then rows are averaged: a bias that depends on the
    position rather than the candidate is spread over all candidates. Raw logits are fine to
    average: a per-prompt offset shifts all candidates of that prompt alike.
    """
    orders = [list(order) for order in orders]
    if not orders:
        raise ValueError("at least one order is needed")
    n = len(orders[0])
    for order in orders:
        if sorted(order) != list(range(n)):
            raise ValueError(f"not a permutation of range({n}): {order}")
    scores = score_fn(orders)
    if scores.shape[0] != len(orders) or scores.shape[-1] != n:
        raise ValueError(
            f"score_fn returned shape {tuple(scores.shape)}, expected ({len(orders)}, ..., {n})"
        )
    inverse = torch.argsort(torch.tensor(orders, device=scores.device), dim=-1)
    aligned = [row.index_select(-1, inv) for row, inv in zip(scores, inverse, strict=True)]
    return torch.stack(aligned).mean(dim=0)
