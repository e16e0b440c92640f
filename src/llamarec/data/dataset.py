"""The processed dataset: dense ids, chronological sequences, titles, and its safe on-disk form."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from llamarec.errors import LlamarecError
from llamarec.io import atomic_dir, write_json
from llamarec.manifest import record, verify

FORMAT_VERSION = 1


@dataclass
class Dataset:
    """Users ``0..n_users-1``; items ``1..n_items`` (0 is padding). ``sequences[u]`` holds user
    ``u``'s items in chronological order; ``titles[i]`` and ``item_raw_ids[i]`` describe item
    ``i`` (index 0 is a placeholder)."""

    name: str
    sequences: list[np.ndarray]
    titles: list[str]
    item_raw_ids: list[str]
    user_raw_ids: list[str]
    params: dict

    @property
    def n_users(self) -> int:
        return len(self.sequences)

    @property
    def n_items(self) -> int:
        return len(self.titles) - 1

    def stats(self) -> dict:
        """Counts and sequence lengths, then what preprocessing's filters dropped (the
        ``raw_*`` and ``dropped_*`` entries of ``params["filters"]``) when it is known."""
        lengths = np.array([len(s) for s in self.sequences])
        n_inter = int(lengths.sum())
        return {
            "dataset": self.name,
            "users": self.n_users,
            "items": self.n_items,
            "interactions": n_inter,
            "mean_seq_len": round(float(lengths.mean()), 2),
            "median_seq_len": float(np.median(lengths)),
            "density": round(n_inter / (self.n_users * self.n_items), 6),
            **self.params.get("filters", {}),
        }

    def save(self, directory: Path) -> None:
        """Write parquet tables + ``meta.json`` into ``directory`` atomically."""
        lengths = [len(s) for s in self.sequences]
        inter = pd.DataFrame({
            "user": np.repeat(np.arange(self.n_users), lengths),
            "item": np.concatenate(self.sequences) if self.sequences else [],
            "order": np.concatenate([np.arange(n) for n in lengths]) if lengths else [],
        })
        items = pd.DataFrame({"item": np.arange(1, self.n_items + 1),
                              "raw_id": self.item_raw_ids[1:], "title": self.titles[1:]})
        users = pd.DataFrame({"user": np.arange(self.n_users), "raw_id": self.user_raw_ids})
        with atomic_dir(directory) as tmp:
            inter.to_parquet(tmp / "interactions.parquet", index=False)
            items.to_parquet(tmp / "items.parquet", index=False)
            users.to_parquet(tmp / "users.parquet", index=False)
            write_json(tmp / "meta.json", {"format_version": FORMAT_VERSION, "name": self.name,
                                           "params": self.params, "stats": self.stats()})
            record(tmp, tmp)

    @classmethod
    def load(cls, directory: Path) -> Dataset:
        """Read a processed dataset written by :meth:`save`, checked against its manifest; a
        damaged one is a :class:`LlamarecError` (the cache rebuilds it, see ``load_dataset``)."""
        meta_path = directory / "meta.json"
        verify(directory, ".")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            inter = pd.read_parquet(directory / "interactions.parquet")
            items = pd.read_parquet(directory / "items.parquet")
            users = pd.read_parquet(directory / "users.parquet")
            if meta.get("format_version") != FORMAT_VERSION:
                raise LlamarecError(f"{meta_path}: format_version {meta.get('format_version')!r} "
                                    f"is not {FORMAT_VERSION}")
            inter = inter.sort_values(["user", "order"], kind="stable")
            splits = np.cumsum(inter.groupby("user").size().to_numpy())[:-1]
            sequences = np.split(inter["item"].to_numpy(np.int64), splits)
            ds = cls(
                name=str(meta["name"]),
                sequences=list(sequences),
                titles=["", *items["title"].astype(str).tolist()],
                item_raw_ids=["", *items["raw_id"].astype(str).tolist()],
                user_raw_ids=users["raw_id"].astype(str).tolist(),
                params=dict(meta["params"]),
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            reason = f"no {exc}" if isinstance(exc, KeyError) else " ".join(str(exc).split())[:160]
            raise LlamarecError(f"{directory}: not a readable processed dataset ({reason})") from None
        if len(ds.sequences) != len(ds.user_raw_ids) or any(
                len(s) and (s.min() < 1 or s.max() > ds.n_items) for s in ds.sequences):
            raise LlamarecError(f"{directory}: not a consistent processed dataset (users or item ids "
                                "do not match its tables)")
        return ds
