"""A bounded LRU of prompt prefixes' key/value caches, so a server does not run a history twice.

A ranking prompt is the instruction and the user's history, then the candidates and the answer
cue. A server sees the same history again (a reload, another page of results, a user's several
clients); with this cache the prefix's key/value tensors are kept after the first request and
later ones run only the candidates' tokens on top of a copy of them (see
:meth:`LetterScorer.score_shared_prefix <llamarec.ranking.verbalizer.LetterScorer.score_shared_prefix>`).

An entry is one prompt's prefix: per layer, its ``(keys, values)`` tensors of shape
``[1, kv_heads, tokens, head_dim]`` on the model's device, keyed by the prefix's token ids. Its
size is the bytes of those tensors (the key's few bytes per token are not counted).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

LayerKV = tuple[torch.Tensor, torch.Tensor]  # one layer's keys and values


def kv_bytes(layers: Sequence[LayerKV]) -> int:
    """Bytes held by the tensors of one entry."""
    return sum(t.numel() * t.element_size() for kv in layers for t in kv)


class PrefixCache:
    """Least-recently-used prefix key/value caches within ``max_bytes``.

    :meth:`put` evicts the least recently used entries (read or stored) until the new one fits;
    an entry larger than ``max_bytes`` is not stored. Callers must never modify a tensor they
    got from :meth:`get` (copy it first). Safe to use from several threads (the server's model
    thread stores, ``/stats`` reads).
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be at least 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = self.hits = self.misses = self.evictions = 0
        self._entries: OrderedDict[tuple[int, ...], tuple[tuple[LayerKV, ...], int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, prefix: Sequence[int]) -> bool:
        """Whether ``prefix`` is held, without counting a hit or a miss or refreshing it."""
        return tuple(prefix) in self._entries

    def get(self, prefix: Sequence[int]) -> tuple[LayerKV, ...] | None:
        """The per-layer keys and values of ``prefix`` (now the most recently used), or None."""
        key = tuple(prefix)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, prefix: Sequence[int], layers: Sequence[LayerKV]) -> bool:
        """Store ``layers`` for ``prefix``, evicting the least recently used entries to stay
        within ``max_bytes``; False (and nothing stored or evicted) if it alone is larger."""
        size = kv_bytes(layers)
        if size > self.max_bytes:
            return False
        key = tuple(prefix)
        with self._lock:
            previous = self._entries.pop(key, None)
            if previous is not None:
                self.bytes -= previous[1]
            self._entries[key] = (tuple(layers), size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, dropped) = self._entries.popitem(last=False)
                self.bytes -= dropped
                self.evictions += 1
        return True

    def stats(self) -> dict[str, Any]:
        """Counters for monitoring: entries, bytes held and allowed, hits, misses, evictions."""
        with self._lock:
            looked_up = self.hits + self.misses
            return {"entries": len(self._entries), "bytes": self.bytes, "max_bytes": self.max_bytes,
                    "hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                    "hit_rate": round(self.hits / looked_up, 4) if looked_up else 0.0}
