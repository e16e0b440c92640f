"""The user's own data: ``interactions.csv`` and ``items.csv``."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from llamarec.data.tables import (
    RawData,
    read_table,
    reject_duplicates,
    require_nonempty,
    to_number,
)
from llamarec.data.titles import clean_title, is_missing_title
from llamarec.errors import LlamarecError

INTERACTIONS = "interactions.csv"
ITEMS = "items.csv"


def read_custom(root: Path, *, unescape_html: bool = True) -> RawData:
    """Read ``interactions.csv`` (``user_id,item_id`` and ``timestamp`` or ``position``) and
    ``items.csv`` (``item_id,title``); titles are cleaned and HTML entities unescaped."""
    ipath, tpath = root / INTERACTIONS, root / ITEMS
    frame = read_table(ipath, ["user_id", "item_id"], optional=["timestamp", "position"])
    order = next((c for c in ("timestamp", "position") if c in frame.columns), None)
    if order is None:
        raise LlamarecError(
            f"{ipath}: needs a 'timestamp' or 'position' column to order each user's items; "
            f"found {', '.join(c for c in frame.columns if c != '_line')}"
        )
    for col in ("user_id", "item_id"):
        require_nonempty(frame, col, ipath)
    frame["time"] = to_number(frame, order, ipath)
    key = ["user_id", "time"] if order == "position" else ["user_id", "item_id", "time"]
    reject_duplicates(frame, key, ipath, "interaction" if order == "timestamp" else "position")

    items = read_table(tpath, ["item_id", "title"])
    require_nonempty(items, "item_id", tpath)
    reject_duplicates(items, ["item_id"], tpath, "item id")
    items = items[~items["title"].map(is_missing_title)]
    titles = items["title"].map(lambda t: clean_title(t, unescape_html=unescape_html))
    inter = pd.DataFrame({"user": frame["user_id"], "item": frame["item_id"], "time": frame["time"]})
    return RawData(inter, pd.DataFrame({"item": items["item_id"], "title": titles}), str(root))
