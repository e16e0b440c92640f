"""The user's own data: ``interactions.csv`` and ``items.csv``."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from llamarec.data.ids import canonical_id, canonical_ids
from llamarec.data.tables import (
    RawData,
    read_table,
    reject_duplicates,
    require_nonempty,
    shown_columns,
    to_number,
)
from llamarec.data.titles import clean_title, is_missing_title
from llamarec.errors import LlamarecError

INTERACTIONS = "interactions.csv"
ITEMS = "items.csv"


def _positions(frame: pd.DataFrame, path: Path) -> pd.Series:
    """The ``position`` column: whole numbers >= 0."""
    values = to_number(frame, "position", path)
    bad = (values < 0) | (values % 1 != 0)
    if bad.any():
        row = frame.loc[bad].iloc[0]
        raise LlamarecError(
            f"{path} line {int(row['_line'])}: column 'position' has value {row['position']!r}; "
            f"expected a whole number >= 0 (0 = the user's oldest interaction)"
        )
    return values


def _titles(items: pd.DataFrame, path: Path, unescape_html: bool) -> pd.Series:
    """Cleaned titles; a title that is not empty but made only of invisible characters
    (whitespace, zero-width characters, bidi controls) is an error, not a missing title."""
    titles = items["title"].map(lambda t: clean_title(t, unescape_html=unescape_html))
    invisible = (items["title"] != "") & (titles == "")
    if invisible.any():
        row = items.loc[invisible].iloc[0]
        raise LlamarecError(
            f"{path} line {int(row['_line'])}: column 'title' has value {row['title']!r}, only "
            f"invisible characters (whitespace, zero-width or bidi controls); expected a title, "
            f"or an empty field for an item without one"
        )
    return titles


def read_custom(root: Path, *, unescape_html: bool = True) -> RawData:
    """Read ``interactions.csv`` (``user_id,item_id`` and ``timestamp`` or ``position``) and
    ``items.csv`` (``item_id,title``); titles are cleaned and HTML entities unescaped.

    Ids are compared in canonical form (see :mod:`llamarec.data.ids`: ``07``, ``7.0`` and
    ``7`` are one id); items keep the id as ``items.csv`` spells it.
    """
    ipath, tpath = root / INTERACTIONS, root / ITEMS
    frame = read_table(ipath, ["user_id", "item_id"], optional=["timestamp", "position"])
    order = next((c for c in ("timestamp", "position") if c in frame.columns), None)
    if order is None:
        raise LlamarecError(
            f"{ipath}: needs a 'timestamp' or 'position' column to order each user's items; "
            f"found {shown_columns(frame.columns)}"
        )
    for col in ("user_id", "item_id"):
        require_nonempty(frame, col, ipath)
        frame[col] = frame[col].map(canonical_id)
    frame["time"] = to_number(frame, order, ipath) if order == "timestamp" else _positions(frame, ipath)
    key = ["user_id", "time"] if order == "position" else ["user_id", "item_id", "time"]
    reject_duplicates(frame, key, ipath, "interaction" if order == "timestamp" else "position")

    items = read_table(tpath, ["item_id", "title"])
    require_nonempty(items, "item_id", tpath)
    reject_duplicates(items, ["item_id"], tpath, "item id")
    keys = canonical_ids(items, "item_id", tpath)
    titles = _titles(items, tpath, unescape_html)
    missing = items["title"].map(is_missing_title)
    inter = pd.DataFrame({"user": frame["user_id"], "item": frame["item_id"], "time": frame["time"]})
    catalogue = pd.DataFrame({"item": keys, "title": titles, "raw_id": items["item_id"]})
    return RawData(inter, catalogue[~missing].reset_index(drop=True), str(root),
                   untitled=keys[missing].tolist())
