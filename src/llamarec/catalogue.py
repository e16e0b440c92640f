"""The item catalogue of a run: raw item ids and titles by dense id, stored in the run itself.

Serving needs nothing else from the dataset, so a run directory carries its catalogue and can
be loaded where the dataset is not available.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pandas as pd

from llamarec.errors import LlamarecError
from llamarec.io import atomic_path


@dataclass(frozen=True)
class Catalogue:
    """``titles[i]`` and ``raw_ids[i]`` describe dense item ``i``; index 0 is padding."""

    raw_ids: list[str]
    titles: list[str]

    @property
    def n_items(self) -> int:
        return len(self.titles) - 1

    @cached_property
    def _folded(self) -> list[str]:
        return [title.casefold() for title in self.titles]

    def search(self, query: str, limit: int = 20) -> list[int]:
        """Dense ids of the items whose title contains ``query`` (case-insensitive), or whose
        raw id is ``query``: the id match first, then titles equal to the query, starting with
        it, with a word starting with it, containing it; catalogue order within each group.
        An empty query lists the first ``limit`` items."""
        if limit < 1:
            return []
        key, raw = " ".join(query.split()).casefold(), query.strip()
        if not key:
            return list(range(1, min(self.n_items, limit) + 1))
        groups: list[list[int]] = [[], [], [], [], []]
        for i in range(1, self.n_items + 1):
            title = self._folded[i]
            if self.raw_ids[i] == raw:
                groups[0].append(i)
            elif title == key:
                groups[1].append(i)
            elif title.startswith(key):
                groups[2].append(i)
            elif f" {key}" in title or f"({key}" in title:
                groups[3].append(i)
            elif key in title:
                groups[4].append(i)
        return [i for group in groups for i in group][:limit]

    def save(self, path: Path) -> None:
        frame = pd.DataFrame({"item": range(1, self.n_items + 1), "raw_id": self.raw_ids[1:],
                              "title": self.titles[1:]})
        with atomic_path(path) as tmp:
            frame.to_parquet(tmp, index=False)

    @classmethod
    def load(cls, path: Path) -> Catalogue:
        try:
            frame = pd.read_parquet(path)
        except (OSError, ValueError) as exc:
            raise LlamarecError(f"{path}: not a readable item catalogue ({' '.join(str(exc).split())})") from None
        missing = {"item", "raw_id", "title"} - set(frame.columns)
        if missing:
            raise LlamarecError(f"{path}: item catalogue lacks column(s) {', '.join(sorted(missing))}")
        if frame["item"].tolist() != list(range(1, len(frame) + 1)):
            raise LlamarecError(f"{path}: item catalogue ids are not 1..{len(frame)} in order")
        return cls(["", *frame["raw_id"].astype(str)], ["", *frame["title"].fillna("").astype(str)])
