"""The paper's preprocessing: titled items only, iterative k-core, chronological sequences."""

from __future__ import annotations

import logging
from typing import Literal, get_args

import numpy as np
import pandas as pd

from llamarec.data.dataset import Dataset
from llamarec.data.tables import RawData
from llamarec.errors import LlamarecError

logger = logging.getLogger(__name__)

DROP_WARN_SHARE = 0.10
"""A filter that drops more than this share of the interactions it is given logs a warning."""

Ties = Literal["item", "random"]
TIES: tuple[str, ...] = get_args(Ties)
"""How one user's interactions with the same time are ordered: ``item``, by item id (the
order of the raw ids), or ``random``, a fixed pseudo-random order. With ``item`` the id order
decides which of a user's same-second ratings is the test or the validation item: on ml-100k
44 % of users rated those two in the same second, so a sequential model can learn the id
order while a content model cannot see it (README, "Ties")."""


def check_ties(ties: str) -> None:
    if ties not in TIES:
        raise LlamarecError(f"ties={ties!r}: use one of {', '.join(TIES)}")


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


def _sorted_ids(ids: np.ndarray) -> np.ndarray:
    """Ids sorted as strings, then (stably) in :func:`_natural_order`."""
    ids = np.sort(ids)
    return ids[np.argsort(_natural_order(pd.Series(ids)).to_numpy(), kind="stable")]


def _filter_report(raw: RawData, titled: pd.DataFrame, cored: pd.DataFrame) -> dict[str, int]:
    """What each filter dropped: the statistics ``data prepare`` prints after the counts."""
    inter = raw.interactions
    listed = inter["item"].isin(titled.index)
    untitled = ~listed & inter["item"].isin(raw.untitled)
    kept = inter[listed]
    return {
        "raw_users": int(inter["user"].nunique()),
        "raw_interactions": len(inter),
        "dropped_untitled_items": len(set(raw.untitled).difference(titled.index)),
        "dropped_interactions_untitled_item": int(untitled.sum()),
        "dropped_interactions_unknown_item": int((~listed & ~untitled).sum()),
        "dropped_kcore_users": int(kept["user"].nunique() - cored["user"].nunique()),
        "dropped_kcore_items": int(kept["item"].nunique() - cored["item"].nunique()),
        "dropped_kcore_interactions": len(kept) - len(cored),
    }


def _warn_about_drops(report: dict[str, int], source: str, min_uc: int, min_sc: int) -> None:
    """One warning line per filter that dropped more than :data:`DROP_WARN_SHARE`."""
    total = report["raw_interactions"]
    unknown = report["dropped_interactions_unknown_item"]
    untitled = report["dropped_interactions_untitled_item"]
    if total and (unknown + untitled) / total > DROP_WARN_SHARE:
        logger.warning(
            "warning: %s: %s of %s interactions (%.1f%%) dropped for lack of an item title: "
            "%s whose item id is not in the items file, %s whose item has no title; check that "
            "both files spell the item ids alike", source, f"{unknown + untitled:,}",
            f"{total:,}", 100 * (unknown + untitled) / total, f"{unknown:,}", f"{untitled:,}")
    entering = total - unknown - untitled
    dropped = report["dropped_kcore_interactions"]
    if entering and dropped / entering > DROP_WARN_SHARE:
        logger.warning(
            "warning: %s: %d/%d-core filtering dropped %s of %s interactions (%.1f%%), "
            "%s users and %s items", source, min_uc, min_sc, f"{dropped:,}", f"{entering:,}",
            100 * dropped / entering, f"{report['dropped_kcore_users']:,}",
            f"{report['dropped_kcore_items']:,}")


def preprocess(raw: RawData, name: str, *, min_uc: int = 5, min_sc: int = 5, ties: str = "item") -> Dataset:
    """Turn raw interactions into a :class:`Dataset` with deterministic dense ids.

    Users get ids by their sorted raw id, items ``1..n`` by their sorted raw id (as the items
    file spells it); each user's items are ordered by time, and interactions with the same
    time by ``ties`` (see :data:`TIES`). What each filter dropped goes into
    ``params["filters"]`` (and the statistics), and a filter that drops more than
    :data:`DROP_WARN_SHARE` of its interactions logs a warning.
    """
    if min_uc < 3:
        raise LlamarecError(f"min_uc={min_uc}: leave-one-out needs at least 3 items per user")
    check_ties(ties)
    titled = raw.items.drop_duplicates("item").set_index("item")
    shown = titled["raw_id"] if "raw_id" in titled.columns else titled.index.to_series()
    inter = k_core(raw.interactions[raw.interactions["item"].isin(titled.index)], min_uc, min_sc)
    report = _filter_report(raw, titled, inter)
    if inter.empty:
        raise LlamarecError(
            f"{raw.source}: no interactions left after dropping untitled items and "
            f"{min_uc}/{min_sc}-core filtering (of {report['raw_interactions']:,}: "
            f"{report['dropped_interactions_unknown_item']:,} with an item id not in the items "
            f"file, {report['dropped_interactions_untitled_item']:,} with an untitled item, "
            f"{report['dropped_kcore_interactions']:,} by the k-core)"
        )
    _warn_about_drops(report, raw.source, min_uc, min_sc)
    users = _sorted_ids(inter["user"].unique())
    keys = inter["item"].unique()
    by_shown = pd.Series(keys, index=shown.loc[keys].to_numpy())
    items = _sorted_ids(by_shown.index.to_numpy())
    keys = by_shown.loc[items].to_numpy()
    user_idx = pd.Series(np.arange(len(users)), index=users)
    item_idx = pd.Series(np.arange(1, len(keys) + 1), index=keys)
    frame = pd.DataFrame({
        "u": inter["user"].map(user_idx).to_numpy(),
        "i": inter["item"].map(item_idx).to_numpy(),
        "t": inter["time"].to_numpy(),
    })
    frame["tie"] = frame["i"] if ties == "item" else _raw_id_hash(inter)
    frame = frame.sort_values(["u", "t", "tie"], kind="stable")
    splits = np.cumsum(frame.groupby("u").size().to_numpy())[:-1]
    return Dataset(
        name=name,
        sequences=list(np.split(frame["i"].to_numpy(np.int64), splits)),
        titles=["", *titled.loc[keys, "title"].tolist()],
        item_raw_ids=["", *map(str, items)],
        user_raw_ids=[str(u) for u in users],
        params={"min_uc": min_uc, "min_sc": min_sc, **({"ties": ties} if ties != "item" else {}),
                "filters": report},
    )


def _raw_id_hash(inter: pd.DataFrame) -> np.ndarray:
    """A fixed pseudo-random key per (user, item) from the raw ids: the same whatever the row
    order, and unrelated to the item ids."""
    pairs = (inter["user"].astype(str) + "\x1f" + inter["item"].astype(str)).to_numpy(dtype=object)
    return pd.util.hash_array(pairs)
