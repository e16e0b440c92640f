"""The server's prefix cache: a bounded LRU of prompt prefixes' key/value caches, and scoring on it."""

from __future__ import annotations

import pytest
import torch

from llamarec.ranking.examples import RankExample
from llamarec.ranking.prefix_cache import PrefixCache, kv_bytes
from llamarec.ranking.ranker import Ranker

TITLES = ["<pad>"] + [f"{word} {i}" for i, word in
                      enumerate(["Heat", "Alien", "Up", "Fargo", "Casino", "Brazil", "Jaws", "Rocky"] * 4, 1)]


def entry(n_bytes: int) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """One layer of float32 keys and values holding ``n_bytes`` together (a multiple of 8)."""
    half = torch.zeros(n_bytes // 8)
    return ((half, half.clone()),)


def example(history: tuple[int, ...], first: int = 1) -> RankExample:
    return RankExample(0, history, tuple(range(first, first + 20)), 0)


@pytest.fixture
def ranker_pair(char_tokenizer, make_tiny_llama):
    """``make(cache, batch_size)``: a ranker on a tiny Llama with ``cache``, and the same one without."""
    model = make_tiny_llama(len(char_tokenizer))

    def make(cache: PrefixCache, batch_size: int = 4) -> tuple[Ranker, Ranker]:
        return (Ranker(model, char_tokenizer, TITLES, batch_size=batch_size, prefix_cache=cache),
                Ranker(model, char_tokenizer, TITLES, batch_size=batch_size))

    return make


# --------------------------------------------------------------------------- the LRU
def test_the_lru_evicts_the_least_recently_used_to_stay_under_the_cap() -> None:
    cache = PrefixCache(max_bytes=240)
    for key in (1, 2, 3):
        assert cache.put([key], entry(80))
    assert cache.get([1]) is not None  # 1 is now the most recently used; 2 the least
    assert cache.put([4], entry(80))
    assert [1] in cache and [2] not in cache and [3] in cache and [4] in cache
    assert cache.bytes == 240 == cache.max_bytes
    assert cache.put([5], entry(160))  # two go: 3, then 1
    assert [5] in cache and [4] in cache and len(cache) == 2 and cache.bytes == 240
    assert cache.stats() == {"entries": 2, "bytes": 240, "max_bytes": 240, "hits": 1, "misses": 0,
                             "evictions": 3, "hit_rate": 1.0}


def test_an_entry_larger_than_the_cap_is_not_stored_and_evicts_nothing() -> None:
    cache = PrefixCache(max_bytes=300)
    cache.put([1], entry(200))
    assert not cache.put([2], entry(400))
    assert [2] not in cache and [1] in cache and cache.bytes == 200
    assert PrefixCache(max_bytes=0).put([1], entry(8)) is False


def test_storing_a_key_again_replaces_its_entry_and_size() -> None:
    cache = PrefixCache(max_bytes=1000)
    cache.put([1, 2], entry(400))
    cache.put((1, 2), entry(200))
    assert len(cache) == 1 and cache.bytes == 200 == kv_bytes(cache.get([1, 2]))
    assert cache.get([1]) is None and cache.stats()["misses"] == 1


# --------------------------------------------------------------------------- scoring on it
def test_scores_on_a_hit_equal_scores_without_the_cache(ranker_pair) -> None:
    cache = PrefixCache(max_bytes=1 << 30)
    cached, plain = ranker_pair(cache)
    examples = [example((1, 2, 3)), example((4, 5, 6, 7, 8, 9), first=3)]
    expected = plain.score(examples)
    miss = cached.score(examples)
    assert cache.stats()["misses"] == 2 and len(cache) == 2
    hit = cached.score(examples)
    assert cache.stats()["hits"] == 2
    torch.testing.assert_close(miss, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hit, expected, atol=1e-5, rtol=1e-5)


def test_the_key_is_the_instruction_and_history_so_other_candidates_hit_too(ranker_pair, char_tokenizer) -> None:
    cache = PrefixCache(max_bytes=1 << 30)
    cached, plain = ranker_pair(cache)
    cached.score([example((1, 2, 3), first=1)])
    (key,) = [list(k) for k in cache._entries]
    assert char_tokenizer.decode(key).endswith("(3) Up 3; \n Candidate pool: (A) ")
    other = [example((1, 2, 3), first=9)]  # the same history, other candidates
    torch.testing.assert_close(cached.score(other), plain.score(other), atol=1e-5, rtol=1e-5)
    assert cache.stats()["hits"] == 1 and len(cache) == 1


def test_repeated_hits_never_change_the_stored_entry(ranker_pair) -> None:
    cache = PrefixCache(max_bytes=1 << 30)
    cached, _ = ranker_pair(cache)
    examples = [example((1, 2, 3))]
    cached.score(examples)
    (stored,) = cache._entries.values()
    layers, size = stored
    before = [(k.clone(), v.clone(), k.data_ptr(), k.shape) for k, v in layers]
    first = cached.score(examples)
    second = cached.score(examples, order="average", permutations=3)  # suffixes extend and crop a copy
    third = cached.score(examples)
    assert cache.stats()["hits"] == 3 and kv_bytes(layers) == size
    for (k, v), (k0, v0, ptr, shape) in zip(layers, before, strict=True):
        assert k.data_ptr() == ptr and k.shape == shape
        assert torch.equal(k, k0) and torch.equal(v, v0)
    torch.testing.assert_close(first, third, atol=0, rtol=0)
    assert second.shape == first.shape


def test_a_batch_mixing_hits_and_misses_scores_as_without_the_cache(ranker_pair) -> None:
    cache = PrefixCache(max_bytes=1 << 30)
    cached, plain = ranker_pair(cache, batch_size=4)
    seen = [example((1, 2, 3)), example((10, 11, 12, 13, 14, 15, 16), first=5)]
    cached.score(seen)
    mixed = [seen[1], example((7,), first=2), seen[0], example((20, 21, 22, 23), first=7), seen[0]]
    torch.testing.assert_close(cached.score(mixed), plain.score(mixed), atol=1e-5, rtol=1e-5)
    assert cache.stats()["hits"] == 3 and cache.stats()["misses"] == 4


def test_permutation_averaging_on_the_cache_scores_as_without_it(ranker_pair) -> None:
    cache = PrefixCache(max_bytes=1 << 30)
    cached, plain = ranker_pair(cache, batch_size=2)
    examples = [example((1, 2, 3)), example((4, 5), first=6), example((8, 9, 10, 11), first=3)]
    expected = plain.score(examples, order="average", permutations=3)
    for _ in range(2):  # misses, then hits
        torch.testing.assert_close(cached.score(examples, order="average", permutations=3), expected,
                                   atol=1e-5, rtol=1e-5)
    assert cache.stats()["hits"] == 3 and cache.stats()["misses"] == 3


def test_a_small_cache_keeps_scoring_right_while_it_evicts(ranker_pair) -> None:
    probe = PrefixCache(max_bytes=1 << 30)
    ranker_pair(probe)[0].score([example((1, 2, 3))])
    one = probe.bytes
    cache = PrefixCache(max_bytes=int(one * 2.5))  # room for about two prefixes of this length
    cached, plain = ranker_pair(cache, batch_size=1)
    examples = [example((i, i + 1, i + 2)) for i in (1, 4, 7, 1, 10)]
    torch.testing.assert_close(cached.score(examples), plain.score(examples), atol=1e-5, rtol=1e-5)
    assert cache.bytes <= cache.max_bytes and len(cache) == 2 and cache.stats()["evictions"] == 2


def test_a_model_with_sliding_window_layers_scores_without_the_cache(char_tokenizer, caplog) -> None:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from llamarec.ranking.verbalizer import LetterScorer

    config = Gemma3TextConfig(vocab_size=len(char_tokenizer), hidden_size=16, intermediate_size=32,
                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                              sliding_window=8)
    scorer = LetterScorer(Gemma3ForCausalLM(config), char_tokenizer, [5, 6], prefix_cache=PrefixCache(1 << 20))
    assert scorer.prefix_cache is None and "sliding-window" in caplog.text
