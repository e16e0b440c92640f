"""The paper's preprocessing: titled items only, iterative k-core, chronological sequences."""

from __future__ import annotations

import numpy as np
import pandas as pd

from llamarec.data.dataset import Dataset
from llamarec.data.tables import RawData
from llamarec.errors import LlamarecError


def k_core(inter: pd.DataFrame, min_uc: int, min_sc: int) -> pd.DataFrame:
    """Drop items with < ``min_sc`` and users with < ``min_uc`` interactions until stable.

    The result is the largest subset in which both bounds hold, whatever the order of passes.
    """
    while True:
        item_counts = inter["item"].map(inter["item"].value_counts())
        user_counts = inter["user"].map(inter["user"].value_counts())
        keep = (item_counts >= min_sc) & (user_counts >= min_uc)
        if keep.all():
            return inter
        inter = inter[keep]


def _natural_order(ids: pd.Series) -> pd.Series:
    """Sort key for raw ids: numerically when all ids are integers, else as strings."""
    numeric = pd.to_numeric(ids, errors="coerce")
    return numeric if numeric.notna().all() else ids


def preprocess(raw: RawData, name: str, *, min_uc: int = 5, min_sc: int = 5) -> Dataset:
    """Turn raw interactions into a :class:`Dataset` with deterministic dense ids.

    Users get ids by their sorted raw id, items ``1..n`` by their sorted raw id; each user's
    items are ordered by (time, raw item id) so that ties have one fixed order.
    """
    if min_uc < 3:
        raise LlamarecError(f"min_uc={min_uc}: leave-one-out needs at least 3 items per user")
    titled = raw.items.drop_duplicates("item").set_index("item")["title"]
    inter = raw.interactions[raw.interactions["item"].isin(titled.index)]
    inter = k_core(inter, min_uc, min_sc)
    if inter.empty:
        raise LlamarecError(
            f"{raw.source}: no interactions left after dropping untitled items and "
            f"{min_uc}/{min_sc}-core filtering"
        )
    users = np.sort(inter["user"].unique())
    users = users[np.argsort(_natural_order(pd.Series(users)).to_numpy(), kind="stable")]
    items = np.sort(inter["item"].unique())
    items = items[np.argsort(_natural_order(pd.Series(items)).to_numpy(), kind="stable")]
    user_idx = pd.Series(np.arange(len(users)), index=users)
    item_idx = pd.Series(np.arange(1, len(items) + 1), index=items)
    frame = pd.DataFrame({
        "u": inter["user"].map(user_idx).to_numpy(),
        "i": inter["item"].map(item_idx).to_numpy(),
        "t": inter["time"].to_numpy(),
    }).sort_values(["u", "t", "i"], kind="stable")
    splits = np.cumsum(frame.groupby("u").size().to_numpy())[:-1]
    return Dataset(
        name=name,
        sequences=list(np.split(frame["i"].to_numpy(np.int64), splits)),
        titles=["", *titled.loc[items].tolist()],
        item_raw_ids=["", *map(str, items)],
        user_raw_ids=[str(u) for u in users],
        params={"min_uc": min_uc, "min_sc": min_sc},
    )
