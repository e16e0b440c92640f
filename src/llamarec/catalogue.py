"""The item catalogue of a run: raw item ids and titles by dense id, stored in the run itself.

Serving needs nothing else from the dataset, so a run directory carries its catalogue and can
be loaded where the dataset is not available.
"""

from __future__ import annotations

from dataclasses import dataclass
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
